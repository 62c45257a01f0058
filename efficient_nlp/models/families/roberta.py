"""RoBERTa and XLM-R (METHODS.md 5): BERT's layout under ``roberta.``; position ids start after
the padding index (``cumsum(ids != pad) * (ids != pad) + pad``, pad = 1); one token type; the
classification head is dense + tanh + ``out_proj`` on the first token (no pooler); the LM head
is dense + GELU + LayerNorm + the decoder tied to the word embedding.

HF names -> ours: as BERT for embeddings and layers; ``classifier.dense`` -> ``pre_classifier``,
``classifier.out_proj`` -> ``classifier``, ``lm_head.{dense,layer_norm,bias}`` -> the same.
"""
from __future__ import annotations

from efficient_nlp.models.config import bert_hf_dict
from efficient_nlp.models.families.bert import bert_embeddings, bert_layers, encoder_family, linear, norm
from efficient_nlp.models.family import register


def _hf_map(model) -> dict:
    m: dict = {}
    bert_embeddings(m, model, "roberta")
    bert_layers(m, model, "roberta")
    if model.roberta.pooler is not None:  # pragma: no cover - RoBERTa traits build no pooler
        linear(m, "pooler.dense", "roberta.pooler.dense")
    if getattr(model, "classifier", None) is not None:
        linear(m, "classifier.dense", "pre_classifier")
        linear(m, "classifier.out_proj", "classifier")
    if getattr(model, "lm_head", None) is not None:
        linear(m, "lm_head.dense", "lm_head.dense")
        norm(m, "lm_head.layer_norm", "lm_head.layer_norm")
        m["lm_head.bias"] = ("lm_head.bias", False)
    return m


def _from_hf(d: dict) -> dict:
    return {"pad_token_id": 1, **d, "model_type": "roberta"}


FAMILY = register(encoder_family(
    "roberta", ("roberta", "xlm-roberta"),
    head_modules=("pre_classifier", "classifier", "lm_head"),
    config_from_hf=_from_hf, config_to_hf=bert_hf_dict, hf_map=_hf_map,
    hf_head_groups={"pooler.": "pooler", "classifier.": "classifier", "lm_head.": "masked-LM head"},
    hf_ignored=r"embeddings\.position_ids|embeddings\.token_type_ids|lm_head\.decoder\.(weight|bias)",
    architectures={"BertModel": "RobertaModel", "BertForSequenceClassification": "RobertaForSequenceClassification",
                   "BertForMaskedLM": "RobertaForMaskedLM"}))
