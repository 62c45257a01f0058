"""BERT-family encoders in Flax NNX and HuggingFace (safetensors) checkpoint I/O.

Quick start::

    from efficient_nlp import models
    model = models.from_pretrained(models.default_model_dir(), num_labels=2)
    out = model(input_ids, attention_mask, token_type_ids, capture=("hidden_states",))
    out.logits, out.intermediates["hidden_states"]

Parameter paths (what rules/regexes match) are the same for every model, e.g.
``bert.encoder.layers.3.attention.query.kernel``, ``bert.encoder.layers.3.ffn.intermediate.kernel``,
``classifier.kernel``, ``lm_head.dense.kernel`` (see `named_params`).
"""

from efficient_nlp.models.bert import (
    CAPTURE_NAMES,
    LAYER_CAPTURE_NAMES,
    BertAttention,
    BertBackbone,
    BertEmbeddings,
    BertEncoder,
    BertFeedForward,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertLayer,
    BertLMHead,
    BertModel,
    BertOutput,
    BertPooler,
    activation,
    attention_bias,
)
from efficient_nlp.models.cnn import SmallCNN, cnn_accuracy, fit_cnn
from efficient_nlp.models.config import ACTIVATIONS, BertConfig
from efficient_nlp.models.hf_checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    default_model_dir,
    from_pretrained,
    hf_name_map,
    load_hf_weights,
    named_params,
    save_hf_checkpoint,
)

__all__ = [
    "ACTIVATIONS",
    "CAPTURE_NAMES",
    "LAYER_CAPTURE_NAMES",
    "BertAttention",
    "BertBackbone",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertFeedForward",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertLayer",
    "BertLMHead",
    "BertModel",
    "BertOutput",
    "BertPooler",
    "CheckpointMismatchError",
    "LoadReport",
    "activation",
    "attention_bias",
    "default_model_dir",
    "from_pretrained",
    "hf_name_map",
    "load_hf_weights",
    "named_params",
    "save_hf_checkpoint",
    "SmallCNN",
    "cnn_accuracy",
    "fit_cnn",
]
