"""ELECTRA: BERT's layout under ``electra.`` whose embedding tables may be
narrower than the hidden width (``embedding_size``; then ``embeddings_project`` maps them up);
no pooler; the classification head is dense + GELU + ``out_proj`` on the first token.  The
generator's masked-LM head (dense to the embedding width + GELU + LayerNorm + tied decoder)
loads as `BertForMaskedLM`.

HF names -> ours: as BERT for embeddings and layers; ``embeddings_project`` ->
``electra.embeddings.project``; ``classifier.dense`` -> ``pre_classifier``,
``classifier.out_proj`` -> ``classifier``; ``generator_predictions.{dense,LayerNorm}`` ->
``lm_head.{dense,layer_norm}``, ``generator_lm_head.bias`` -> ``lm_head.bias``;
``discriminator_predictions.{dense,dense_prediction}`` -> the same names in
`efficient_nlp.models.ElectraForPreTraining` (the replaced-token-detection head, which a
classifier loading the checkpoint ignores, as HF does).
"""
from __future__ import annotations

from efficient_nlp.models.config import bert_hf_dict
from efficient_nlp.models.families.bert import bert_embeddings, bert_layers, encoder_family, heads, linear
from efficient_nlp.models.family import register


def _hf_map(model) -> dict:
    m: dict = {}
    bert_embeddings(m, model, "electra")
    if model.electra.embeddings.project is not None:
        linear(m, "embeddings_project", "electra.embeddings.project")
    bert_layers(m, model, "electra")
    heads(m, model, pre_classifier="classifier.dense", classifier="classifier.out_proj",
          lm=("generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias"))
    if getattr(model, "discriminator_predictions", None) is not None:
        for name in ("dense", "dense_prediction"):
            linear(m, f"discriminator_predictions.{name}", f"discriminator_predictions.{name}")
    return m


def _from_hf(d: dict) -> dict:
    out = {**d, "model_type": "electra"}
    if out.get("embedding_size") == out.get("hidden_size"):
        out.pop("embedding_size", None)
    return out


def _to_hf(config, architecture: str) -> dict:
    d = bert_hf_dict(config, architecture)
    d["embedding_size"] = config.embedding_width
    return d


FAMILY = register(encoder_family(
    "electra", ("electra",),
    head_modules=("pre_classifier", "classifier", "lm_head", "discriminator_predictions"),
    config_from_hf=_from_hf, config_to_hf=_to_hf, hf_map=_hf_map,
    hf_head_groups={"classifier.": "classifier", "generator_predictions.": "masked-LM head",
                    "generator_lm_head.": "masked-LM head", "discriminator_predictions.": "discriminator head"},
    hf_ignored=r"embeddings\.position_ids|embeddings\.token_type_ids|generator_lm_head\.weight",
    architectures={"BertModel": "ElectraModel", "BertForSequenceClassification": "ElectraForSequenceClassification",
                   "BertForMaskedLM": "ElectraForMaskedLM", "ElectraForPreTraining": "ElectraForPreTraining"}))
