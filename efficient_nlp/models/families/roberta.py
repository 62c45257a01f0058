"""RoBERTa and XLM-R: BERT's layout under ``roberta.``; position ids start after
the padding index (``cumsum(ids != pad) * (ids != pad) + pad``, pad = 1); one token type; the
bare model has BERT's tanh pooler, but the classification head does not read it: it is dense +
tanh + ``out_proj`` on the first token; the LM head is dense + GELU + LayerNorm + the decoder
tied to the word embedding.

HF names -> ours: as BERT for embeddings, layers and pooler; ``classifier.dense`` ->
``pre_classifier``, ``classifier.out_proj`` -> ``classifier``, ``lm_head.{dense,layer_norm,bias}``
-> the same.  `hf_map` reads the backbone name from the model, so families with RoBERTa's
layout under another prefix reuse it (``data2vec_text``).
"""
from __future__ import annotations

from efficient_nlp.models.config import bert_hf_dict
from efficient_nlp.models.families.bert import bert_embeddings, bert_layers, encoder_family, heads, linear
from efficient_nlp.models.family import register


def hf_map(model) -> dict:
    """HF tensor names of RoBERTa's layout -> our parameter paths (backbone ``model_type``)."""
    backbone = model.config.model_type
    m: dict = {}
    bert_embeddings(m, model, backbone)
    bert_layers(m, model, backbone)
    if model.backbone.pooler is not None:  # the bare model's, as in HF RobertaModel
        linear(m, "pooler.dense", f"{backbone}.pooler.dense")
    heads(m, model, pre_classifier="classifier.dense", classifier="classifier.out_proj",
          lm=("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"))
    return m


def _from_hf(d: dict) -> dict:
    return {"pad_token_id": 1, **d, "model_type": "roberta"}


def _to_hf(config, architecture: str) -> dict:
    """BERT's ``config.json`` keys; XLM-R keeps its ``model_type`` and class names."""
    if config.hf_model_type == "xlm-roberta":
        architecture = "XLM" + architecture
    return bert_hf_dict(config, architecture)


FAMILY = register(encoder_family(
    "roberta", ("roberta", "xlm-roberta"),
    head_modules=("{backbone}.pooler", "pre_classifier", "classifier", "lm_head"),
    config_from_hf=_from_hf, config_to_hf=_to_hf, hf_map=hf_map,
    hf_head_groups={"pooler.": "pooler", "classifier.": "classifier", "lm_head.": "masked-LM head"},
    hf_ignored=r"embeddings\.position_ids|embeddings\.token_type_ids|lm_head\.decoder\.(weight|bias)",
    architectures={"BertModel": "RobertaModel", "BertForSequenceClassification": "RobertaForSequenceClassification",
                   "BertForMaskedLM": "RobertaForMaskedLM"}))
