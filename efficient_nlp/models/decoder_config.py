"""Configuration of the decoder families (GPT-2, and the Llama family: Llama, Mistral, Qwen2).

`DecoderConfig` is a frozen dataclass holding the hyper-parameters that decide the shapes and the
behaviour of `efficient_nlp.models.decoder`.  Names follow HF's Llama config where one exists
(``hidden_size``, ``num_key_value_heads``, ``rope_theta`` ...); what differs between the
families is spelled out as plain fields instead of being implied by the name:

=====================  ==========================  =======================================
field                  GPT-2                       Llama family
=====================  ==========================  =======================================
norm_type              ``layernorm`` (with bias)   ``rmsnorm``
position_type          ``learned`` table           ``rotary`` (``rope_theta``, ``rope_scaling``)
gated_ffn              False (``c_fc``, ``c_proj``)  True: ``down(act(gate(x)) * up(x))``
qkv_bias / o_bias      True / True                 False (Qwen2: True / False)
tie_word_embeddings    True                        per checkpoint
=====================  ==========================  =======================================

Each family file translates HF ``config.json`` to these names and back
(`efficient_nlp.models.family.Family.config_from_hf` / ``config_to_hf``).  As for the encoders,
structured pruning leaves per-layer sizes in ``layer_num_attention_heads``,
``layer_num_key_value_heads`` and ``layer_intermediate_sizes``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from efficient_nlp.models.config import ConfigFields

#: ``rope_scaling`` types understood by `efficient_nlp.models.decoder.rope_frequencies`.
ROPE_SCALING_TYPES = ("default", "linear", "llama3")
NORM_TYPES = ("layernorm", "rmsnorm")
POSITION_TYPES = ("learned", "rotary")
DECODER_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ConfigFields):
    """Hyper-parameters of a decoder-only language model.

    Attributes:
      vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: the
        architecture.
      num_key_value_heads: key/value heads (grouped-query attention: each serves
        ``num_attention_heads / num_key_value_heads`` query heads); None = one per query head.
      head_dim: width of one head; None = ``hidden_size // num_attention_heads``.
      hidden_act: FFN activation (``silu`` for SwiGLU, ``gelu_new`` for GPT-2).
      max_position_embeddings: rows of the learned position table / longest sequence.
      norm_type, norm_eps: ``layernorm`` or ``rmsnorm`` and its epsilon.
      position_type: ``learned`` (a position table added to the token embedding) or ``rotary``.
      rope_theta: base of the rotary frequencies.
      rope_scaling: None or ``(("rope_type", "linear" | "llama3"), ("factor", f), ...)``: a
        sorted tuple of items (hashable); `rope_scaling_dict` gives it back as a dict.
      gated_ffn: SwiGLU-style FFN with a ``gate`` projection.
      qkv_bias, o_bias, ffn_bias: biases of the q/k/v, attention output and FFN projections.
      tie_word_embeddings: the LM head is the transposed word embedding.
      hidden_dropout_prob, attention_probs_dropout_prob, embedding_dropout_prob: dropout after
        each residual branch, on the attention probabilities, after the embeddings.
      initializer_range: std of the normal initialiser of fresh weights.
      bos_token_id, eos_token_id, pad_token_id: special token ids (may be None).
      sliding_window: None, or the number of previous tokens a query sees (Mistral).
      layer_num_attention_heads, layer_num_key_value_heads, layer_intermediate_sizes: None, or
        per-layer sizes (structured pruning).
      model_type: the family (``gpt2`` or ``llama``); hf_model_type: the HF ``model_type`` read
        from ``config.json`` when it is another member of the family (``qwen2``, ``mistral``).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    position_type: str = "rotary"
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    gated_ffn: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    ffn_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    embedding_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None
    layer_num_attention_heads: tuple[int, ...] | None = None
    layer_num_key_value_heads: tuple[int, ...] | None = None
    layer_intermediate_sizes: tuple[int, ...] | None = None
    model_type: str = "llama"
    hf_model_type: str | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        for name, valid in (("norm_type", NORM_TYPES), ("position_type", POSITION_TYPES),
                            ("hidden_act", DECODER_ACTIVATIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not supported; choose one of {valid}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}; set head_dim explicitly")
        kv = self.num_kv_heads
        if kv < 1 or self.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={kv} (each key/value head serves a group of query heads)")
        if self.position_type == "rotary" and self.attention_head_dim % 2:
            raise ValueError(f"rotary positions need an even head width, got head_dim={self.attention_head_dim}")
        kind = self.rope_scaling_dict.get("rope_type", "default") if self.rope_scaling else "default"
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {ROPE_SCALING_TYPES}")
        self._check_per_layer("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes")
        for i in range(self.num_hidden_layers):
            heads, kv = self.layer_num_heads(i), self.layer_num_kv_heads(i)
            if (kv == 0) != (heads == 0) or (kv and heads % kv):
                raise ValueError(f"layer {i}: {heads} query heads cannot be shared by {kv} key/value heads "
                                 "(need a multiple; 0 only together)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DecoderConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"DecoderConfig.sliding_window must be None or >= 1, got {self.sliding_window!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def embedding_width(self) -> int:
        return self.hidden_size

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    def layer_num_kv_heads(self, i: int) -> int:
        if self.layer_num_key_value_heads is not None:
            return self.layer_num_key_value_heads[i]
        if self.layer_num_attention_heads is not None:  # the same group size as the full model
            return self.layer_num_attention_heads[i] // (self.num_attention_heads // self.num_kv_heads)
        return self.num_kv_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence id(s) as a tuple (empty when unknown)."""
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (int(self.eos_token_id),)

    # ------------------------------------------------------------------ construction
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict or None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "DecoderConfig":
        """Build from a HF ``config.json`` dict (translated by its family); HF-only keys are ignored."""
        cls._check_keys(overrides)
        from efficient_nlp.models.family import family_for_config

        family = family_for_config(d)
        hf_model_type = d.get("model_type")
        ours = family.config_from_hf(d)
        if hf_model_type not in (None, family.name):
            ours["hf_model_type"] = hf_model_type
        kwargs = {k: ours[k] for k in cls.field_names() if k in ours}
        kwargs.update(overrides)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}")
        return cls(**kwargs)


def per_layer_hf(config: DecoderConfig) -> dict[str, Any]:
    """The per-layer size fields of ``config`` that are set (for a ``config.json``; our loader
    reads them back, ``transformers`` cannot build such a model)."""
    d = {}
    for k in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"):
        if getattr(config, k) is not None:
            d[k] = list(getattr(config, k))
    if d:
        d["head_dim"] = config.attention_head_dim
    return d
