"""Encoder families (BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA, data2vec-text) and decoder
families (GPT-2; Llama, Mistral, Qwen2) in Flax NNX,
their family descriptions (`efficient_nlp.models.family`) and HuggingFace (safetensors)
checkpoint I/O.

Quick start::

    from efficient_nlp import models
    model = models.from_pretrained(models.default_model_dir(), num_labels=2)
    out = model(input_ids, attention_mask, token_type_ids, capture=("hidden_states",))
    out.logits, out.intermediates["hidden_states"]

Parameter paths (what rules/regexes match) share one layout under the family's backbone name,
e.g. ``bert.encoder.layers.3.attention.query.kernel``, ``roberta.encoder.layers.3.ffn.intermediate.kernel``,
``classifier.kernel``, ``lm_head.dense.kernel`` (see `named_params`); transforms find sites by
role through `family` instead of by path.
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
    Encoder,
    EncoderForMaskedLM,
    EncoderForSequenceClassification,
    EncoderModel,
    activation,
    attention_bias,
)
from efficient_nlp.models import family
from efficient_nlp.models.decoder import (
    Decoder,
    DecoderForCausalLM,
    DecoderModel,
    DecoderOutput,
    KVCache,
)
from efficient_nlp.models.decoder_config import DecoderConfig
from efficient_nlp.models.electra_pretraining import ElectraDiscriminatorHead, ElectraForPreTraining
from efficient_nlp.models.generate import decode_speed, generate, sample_logits
from efficient_nlp.models.cnn import SmallCNN, cnn_accuracy, fit_cnn
from efficient_nlp.models.config import ACTIVATIONS, ENCODER_TRAITS, BertConfig, EncoderTraits
from efficient_nlp.models.family import Family, FamilyError, family_of

EncoderConfig = BertConfig
from efficient_nlp.models.hf_checkpoint import (
    CheckpointMismatchError,
    LoadReport,
    config_from_pretrained,
    task_model_class,
    default_decoder_dir,
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
    "config_from_pretrained",
    "task_model_class",
    "Decoder",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderModel",
    "DecoderOutput",
    "KVCache",
    "ElectraDiscriminatorHead",
    "ElectraForPreTraining",
    "ENCODER_TRAITS",
    "Encoder",
    "EncoderConfig",
    "EncoderForMaskedLM",
    "EncoderForSequenceClassification",
    "EncoderModel",
    "EncoderTraits",
    "Family",
    "FamilyError",
    "family",
    "family_of",
    "LoadReport",
    "activation",
    "attention_bias",
    "default_decoder_dir",
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
