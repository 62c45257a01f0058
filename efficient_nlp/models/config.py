"""Configuration of BERT-layout encoders (BERT, RoBERTa / XLM-R, DistilBERT, ELECTRA, data2vec-text).

`BertConfig` (also exported as ``EncoderConfig``) is a frozen dataclass holding exactly the
hyper-parameters that decide the shapes and the behaviour of `efficient_nlp.models.bert`, in
BERT's names.  ``model_type`` says which family the model belongs to; the family's traits
(`EncoderTraits`: pooler or not, RoBERTa's padding-aware positions, the classification head's
activation, ...) follow from it.  ``from_dict`` / ``to_hf_dict`` read and write a HuggingFace
``config.json`` through the family's own translation (`efficient_nlp.models.family`), so
DistilBERT's ``dim`` / ``n_layers`` arrive as ``hidden_size`` / ``num_hidden_layers``; unknown
HF keys such as ``architectures`` or ``use_cache`` are ignored.  A checkpoint saved by
`efficient_nlp.models.save_hf_checkpoint` is readable by ``transformers``.

Width changes used by compression methods are expressed directly:

* ``head_dim`` decouples the attention width (``num_attention_heads * head_dim``) from
  ``hidden_size`` (structured head pruning, BinaryBERT's half-width model);
* ``intermediate_size`` may be any positive integer (neuron pruning);
* ``layer_num_attention_heads`` / ``layer_intermediate_sizes`` (optional tuples, one entry per
  layer, entries may be 0) give each layer its own head count / FFN width, as left by
  structured pruning (`efficient_nlp.prune.shrink`).  They are written to ``config.json`` only
  when set (``transformers`` cannot build such a model; our loader can).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Activation names understood by `efficient_nlp.models.bert.activation`.  "gelu" is the exact
# (erf) GELU as in HF; "gelu_new", "gelu_pytorch_tanh" and "gelu_fast" are the tanh
# approximation.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")

# Shape-defining fields: overriding one of them when loading a checkpoint makes the
# checkpoint not fit (reported by the loader as missing / unexpected / mis-shaped tensors).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "head_dim",
    "num_labels",
    "embedding_size",
)


def read_config_json(model_dir_or_config_json) -> dict[str, Any]:
    """The dict of a ``config.json`` (a directory holding it, or the file itself)."""
    path = os.fspath(model_dir_or_config_json)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json found at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


class ConfigFields:
    """What the model configs share (a frozen dataclass inherits it): head / FFN sizes per
    layer, checked field names, ``replace``, ``from_pretrained`` (``config.json`` through the family's translation) and
    ``to_hf_dict`` (back, through the family's ``config_to_hf``)."""

    @property
    def attention_head_dim(self) -> int:
        """Width of one head (``head_dim`` or ``hidden_size // num_attention_heads``)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Width of the query/key/value projections: ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    def layer_num_heads(self, i: int) -> int:
        """Number of attention heads of layer ``i``."""
        if self.layer_num_attention_heads is not None:
            return self.layer_num_attention_heads[i]
        return self.num_attention_heads

    def layer_intermediate_size(self, i: int) -> int:
        """FFN width of layer ``i``."""
        if self.layer_intermediate_sizes is not None:
            return self.layer_intermediate_sizes[i]
        return self.intermediate_size

    def _check_per_layer(self, *names: str) -> None:
        """Per-layer size fields (None, or one int >= 0 per layer; lists become tuples)."""
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            object.__setattr__(self, name, value)  # lists (from JSON) -> hashable tuples
            if len(value) != self.num_hidden_layers or any(
                    not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
                raise ValueError(f"{type(self).__name__}.{name} must hold {self.num_hidden_layers} ints >= 0 "
                                 f"(one per layer), got {value!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def _check_keys(cls, keys) -> None:
        valid = cls.field_names()
        unknown = sorted(k for k in keys if k not in valid)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid keys are: {', '.join(valid)}")

    def replace(self, **kwargs):
        """A copy with some fields changed; unknown names raise ValueError listing valid keys."""
        self._check_keys(kwargs)
        return dataclasses.replace(self, **kwargs)

    @classmethod
    def from_pretrained(cls, model_dir_or_config_json: str | os.PathLike, **overrides):
        """Read ``config.json`` (a directory holding it, or the file itself) and apply overrides.

        Overrides that change shapes (e.g. ``num_hidden_layers``) are accepted here; loading
        weights into such a config then fails with the loader's clear mismatch report.
        """
        return cls.from_dict(read_config_json(model_dir_or_config_json), **overrides)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        """A HuggingFace-style ``config.json`` dict in the family's own names (readable by the
        ``transformers`` config class of ``model_type``)."""
        from efficient_nlp.models.family import get_family

        return get_family(self.model_type).config_to_hf(self, architecture)


@dataclasses.dataclass(frozen=True)
class EncoderTraits:
    """What differs between the BERT-layout encoder families, by ``model_type``
    (`ENCODER_TRAITS`; a family file may add its own entry).

    Attributes:
      pooler: the classifier reads BERT's tanh pooler; otherwise it reads the first token
        through ``pre_classifier`` (dense + ``classifier_act``).
      base_pooler: the bare model (`BertModel`) has the tanh pooler (HF ``RobertaModel`` has
        one although RoBERTa's classifier does not read it).
      padded_positions: RoBERTa's position ids ``cumsum(ids != pad) * (ids != pad) + pad``.
      classifier_act: activation after ``pre_classifier`` (None with a pooler).
      classifier_in_dropout: dropout on the first token before ``pre_classifier``.
      lm_act: activation of the masked-LM transform (None: ``hidden_act``).
      attention_output_dropout: dropout on the attention output dense before the residual
        (DistilBERT has none there).
    """

    pooler: bool = True
    base_pooler: bool = True
    padded_positions: bool = False
    classifier_act: str | None = None
    classifier_in_dropout: bool = False
    lm_act: str | None = None
    attention_output_dropout: bool = True


ENCODER_TRAITS = {
    "bert": EncoderTraits(),
    "roberta": EncoderTraits(pooler=False, padded_positions=True, classifier_act="tanh",
                             classifier_in_dropout=True, lm_act="gelu"),
    "distilbert": EncoderTraits(pooler=False, base_pooler=False, classifier_act="relu",
                                attention_output_dropout=False),
    "electra": EncoderTraits(pooler=False, base_pooler=False, classifier_act="gelu", classifier_in_dropout=True,
                             lm_act="gelu"),
}


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigFields):
    """Hyper-parameters of a BERT encoder (names and defaults as in HF ``BertConfig``).

    Attributes:
      vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size:
        the architecture.
      hidden_act: feed-forward (and MLM transform) activation, one of `ACTIVATIONS`.
      hidden_dropout_prob: dropout after embeddings and after each residual branch.
      attention_probs_dropout_prob: dropout on the attention probabilities.
      max_position_embeddings, type_vocab_size: sizes of the position / segment tables.
      layer_norm_eps: epsilon of every LayerNorm.
      pad_token_id: id of the padding token (informational; padding is given by the mask).
      head_dim: width of one attention head; None means ``hidden_size // num_attention_heads``.
      num_labels: outputs of the sequence-classification head (1 = regression).
      classifier_dropout: dropout before the classifier; None means ``hidden_dropout_prob``.
      initializer_range: std of the normal initialiser of fresh weights.
      layer_num_attention_heads: None, or per-layer head counts (length num_hidden_layers, >= 0;
        each head keeps ``attention_head_dim``).  None = ``num_attention_heads`` everywhere.
      layer_intermediate_sizes: None, or per-layer FFN widths (>= 0); None = ``intermediate_size``.
      model_type: the family (a key of `ENCODER_TRAITS`: "bert", "roberta", "distilbert",
        "electra", "data2vec_text", or one a family file adds); decides the `EncoderTraits`.
      embedding_size: width of the embedding tables (ELECTRA); None = ``hidden_size``.  When it
        differs, a projection maps embeddings to ``hidden_size``.
      type_vocab_size may be 0 (no token-type table, DistilBERT).
      hf_model_type: the HF ``model_type`` read from ``config.json`` when it is not the
        family's main one (``xlm-roberta`` for the RoBERTa family); written back by `to_hf_dict`.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    head_dim: int | None = None
    num_labels: int = 2
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    layer_num_attention_heads: tuple[int, ...] | None = None
    layer_intermediate_sizes: tuple[int, ...] | None = None
    model_type: str = "bert"
    embedding_size: int | None = None
    hf_model_type: str | None = None

    def __post_init__(self):
        if self.model_type not in ENCODER_TRAITS:
            from efficient_nlp.models.family import families

            families()  # a family file may add its traits
        if self.model_type not in ENCODER_TRAITS:
            from efficient_nlp.models.family import families

            if getattr(families().get(self.model_type), "kind", None) == "decoder":
                raise ValueError(f"{self.model_type!r} is a decoder family: build its models from a "
                                 "DecoderConfig (efficient_nlp.models.DecoderConfig)")
            raise ValueError(f"BertConfig.model_type={self.model_type!r} is not an encoder family; "
                             f"valid: {sorted(ENCODER_TRAITS)}")
        if self.embedding_size is not None and (not isinstance(self.embedding_size, int) or self.embedding_size < 1):
            raise ValueError(f"BertConfig.embedding_size must be None or a positive int, got {self.embedding_size!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"BertConfig.type_vocab_size must be an int >= 0, got {self.type_vocab_size!r}")
        self._check_per_layer("layer_num_attention_heads", "layer_intermediate_sizes")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly to choose the "
                    "attention width (num_attention_heads * head_dim)."
                )
        elif not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"BertConfig.head_dim must be None or a positive int, got {self.head_dim!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {ACTIVATIONS}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def traits(self) -> EncoderTraits:
        """The family's `EncoderTraits` (from ``model_type``)."""
        return ENCODER_TRAITS[self.model_type]

    @property
    def embedding_width(self) -> int:
        """Width of the embedding tables (``embedding_size`` or ``hidden_size``)."""
        return self.embedding_size or self.hidden_size

    # ------------------------------------------------------------------ construction
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "BertConfig":
        """Build from a dict in HF ``config.json`` form; HF-only keys are ignored.

        ``num_labels`` is taken from ``id2label`` when present (HF stores it that way).
        Overrides are validated: an unknown name raises ValueError naming the valid keys.
        """
        cls._check_keys(overrides)
        from efficient_nlp.models.family import family_for_config

        family = family_for_config(d)
        hf_model_type = d.get("model_type")
        d = family.config_from_hf(d)
        if hf_model_type not in (None, family.name, family.model_types[0]):
            d["hf_model_type"] = hf_model_type
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"config.json has position_embedding_type={pos_type!r}; only 'absolute' is supported."
            )
        kwargs = {k: d[k] for k in cls.field_names() if k in d}
        if "id2label" in d and isinstance(d["id2label"], dict) and d["id2label"]:
            kwargs["num_labels"] = len(d["id2label"])
        kwargs.update(overrides)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing} (in BERT's names)")
        return cls(**kwargs)

    def to_hf_dict(self, architecture: str = "BertModel") -> dict[str, Any]:
        """The ``config.json`` dict (see `bert_hf_dict` for BERT's)."""
        return super().to_hf_dict(architecture)


def bert_hf_dict(config: BertConfig, architecture: str) -> dict[str, Any]:
    """``config`` as a BERT-style ``config.json`` dict (BERT, RoBERTa and ELECTRA share it).

    ``head_dim`` is written only when it differs from ``hidden_size // num_attention_heads``
    (transformers' own models cannot represent such a model, but our loader can).
    """
    d: dict[str, Any] = {"architectures": [architecture]}
    for k, v in config.to_dict().items():
        if k in ("head_dim", "num_labels", "embedding_size", "hf_model_type"):
            continue
        if k in ("layer_num_attention_heads", "layer_intermediate_sizes"):
            if v is not None:
                d[k] = list(v)
                d["head_dim"] = config.attention_head_dim  # pinned: heads per layer vary
            continue
        d[k] = v
    if config.head_dim is not None and (
        config.hidden_size % config.num_attention_heads
        or config.head_dim != config.hidden_size // config.num_attention_heads
    ):
        d["head_dim"] = config.head_dim
    d["model_type"] = config.hf_model_type or config.model_type
    d.update(label_maps(config.num_labels))
    d["position_embedding_type"] = "absolute"
    d["tie_word_embeddings"] = True
    return d


def label_maps(num_labels: int) -> dict[str, Any]:
    """HF's ``id2label`` / ``label2id`` for ``num_labels`` generic labels."""
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
