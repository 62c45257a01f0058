"""data2vec-text (Baevski et al. 2022, "data2vec: A General Framework for Self-supervised
Learning in Speech, Vision and Language"): RoBERTa's architecture (padding-aware positions,
bare-model pooler, dense + tanh classification head, GELU LM head) under the backbone name
``data2vec_text`` (HF ``model_type`` ``data2vec-text``, classes ``Data2VecText...``).

The whole family is this file: its `EncoderTraits`, its config translation, and its `Family`
entry, which reuses RoBERTa's weight map (`efficient_nlp.models.families.roberta.hf_map`).
"""
from __future__ import annotations

from efficient_nlp.models.config import ENCODER_TRAITS, bert_hf_dict
from efficient_nlp.models.families import roberta
from efficient_nlp.models.families.bert import encoder_family
from efficient_nlp.models.family import register

NAME = "data2vec_text"  # our model_type and backbone attribute (a Python name)
ENCODER_TRAITS[NAME] = ENCODER_TRAITS["roberta"]  # the forward pass: RoBERTa's


def _from_hf(d: dict) -> dict:  # HF config.json -> BertConfig's names
    return {"pad_token_id": 1, **d, "model_type": NAME}


def _to_hf(config, architecture: str) -> dict:  # BertConfig -> HF config.json
    return {**bert_hf_dict(config, architecture), "model_type": "data2vec-text"}


FAMILY = register(encoder_family(
    NAME, ("data2vec-text",),
    head_modules=roberta.FAMILY.head_modules, config_from_hf=_from_hf, config_to_hf=_to_hf,
    hf_map=roberta.hf_map,  # HF tensor names -> ours: RoBERTa's, under the prefix "data2vec_text."
    hf_head_groups=roberta.FAMILY.hf_head_groups, hf_ignored=roberta.FAMILY.hf_ignored,
    architectures={ours: theirs.replace("Roberta", "Data2VecText")
                   for ours, theirs in roberta.FAMILY.architectures.items()}))
