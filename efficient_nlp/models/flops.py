"""Forward FLOPs of a model from its config: the one FLOPs counter of the library.

FLOPs are ``2 x`` the multiply-adds of every matmul, for ``batch`` sequences of ``seq_len``
tokens; embedding lookups, LayerNorm, activations, softmax and additions are not counted.
Per layer ``i`` with ``H_i`` heads (``KV_i`` key/value heads), head width ``d``, FFN width
``I_i`` and hidden size ``h`` (``t = seq_len``):

* projections: ``2 t h d (2 H_i + 2 KV_i)`` (Q and O per head, K and V per KV head);
* attention: ``2 t^2 d H_i`` for the scores plus as much for the context;
* FFN: ``2 t h I_i`` per matrix (two, three with a gated FFN: a family with ``ffn_gate``);

plus, once per model, the embedding projection when the embedding width differs from ``h``
(``2 t e h``), the head's dense layer on the first token (``2 h^2``: BERT's pooler or the
``pre_classifier`` of the other encoders) and, with ``classifier=True``, the classifier
(``2 h num_labels``).  A decoder (GPT-2, Llama family) has no dense layer in its head; with
``classifier=True`` its LM head is counted at every position (``2 t h V``).  Per-layer head counts and FFN widths of a pruned config are read from
``config.layer_num_heads(i)`` / ``config.layer_intermediate_size(i)``.

Training (`train_flops`): the forward pass with the head of the objective at every position
it reads (`head_flops`), times three.  The backward pass computes, for every matmul of the
forward pass, one product of the same size for the gradient of its input and one for the
gradient of its weight, so a training step costs about three forward passes (the convention
of Kaplan et al. 2020, "6 N" FLOPs per token for N parameters); the optimizer update and
elementwise work are not counted.
"""
from __future__ import annotations

from efficient_nlp.models import family as F


def _kv_heads(config, i: int, heads: int) -> int:
    per_layer = getattr(config, "layer_num_kv_heads", None)
    if callable(per_layer):
        return int(per_layer(i))
    kv = getattr(config, "num_key_value_heads", None)
    if kv is None or int(kv) >= config.num_attention_heads:
        return heads
    return int(kv)


def layer_flops(config, i: int, seq_len: int = 128) -> int:
    """Forward FLOPs of layer ``i`` for one sequence of ``seq_len`` tokens (see the module doc)."""
    t, h, d = seq_len, config.hidden_size, config.attention_head_dim
    heads = config.layer_num_heads(i)
    kv = _kv_heads(config, i, heads)
    fam = F.family_for_config({"model_type": getattr(config, "model_type", None)})
    ffn_matrices = 3 if "ffn_gate" in fam.layer_sites else 2
    return int(2 * t * h * d * (2 * heads + 2 * kv)      # Q, K, V, O projections
               + 2 * t * t * d * heads * 2               # scores and context
               + 2 * t * h * config.layer_intermediate_size(i) * ffn_matrices)


def forward_flops(config_or_model, seq_len: int = 128, batch: int = 1, *, classifier: bool = False) -> int:
    """Forward FLOPs of ``batch`` sequences of ``seq_len`` tokens (see the module doc).

    ``config_or_model``: a model config (``BertConfig``) or a model (its ``config``).  With the
    default ``classifier=False`` the count is the layer stack plus the head's dense layer, the
    convention of structured pruning and of the NAS FLOPs model; ``classifier=True`` adds the
    final classifier (every matmul of a sequence-classification forward pass).
    """
    config = getattr(config_or_model, "config", config_or_model)
    t, h = seq_len, config.hidden_size
    total = sum(layer_flops(config, i, t) for i in range(config.num_hidden_layers))
    e = getattr(config, "embedding_width", h)
    if e != h:
        total += 2 * t * e * h                            # embedding projection
    if F.family_for_config({"model_type": config.model_type}).kind == "decoder":
        if classifier:
            total += 2 * t * h * config.vocab_size        # LM head at every position
        return int(batch * total)
    total += 2 * h * h                                    # pooler / pre-classifier dense
    if classifier:
        total += 2 * h * config.num_labels
    return int(batch * total)


#: Heads `head_flops` knows: what a training objective reads from the last hidden states.
HEADS = ("mlm", "lm", "discriminator", "classification", None)


def head_flops(config, seq_len: int = 128, head: str | None = "mlm") -> int:
    """Forward FLOPs of one sequence's ``head`` (``t = seq_len``, width ``h``, embedding width
    ``e``, vocabulary ``V``):

    * ``"mlm"``: a masked-LM head at every position, the transform dense then the (tied)
      decoder, ``2 t (h e + e V)``; the loss usually reads only the masked positions, but the
      logits of all positions are computed;
    * ``"lm"``: a decoder's LM head at every position, ``2 t h V``;
    * ``"discriminator"``: ELECTRA's replaced-token head at every position, ``2 t (h^2 + h)``;
    * ``"classification"``: the dense layer on the first token and the classifier,
      ``2 h^2 + 2 h L`` for ``L`` labels (a decoder: the LM head, as `forward_flops`);
    * None: no head.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known heads: {HEADS}")
    t, h, v = int(seq_len), config.hidden_size, config.vocab_size
    e = getattr(config, "embedding_width", h)
    if head == "mlm":
        return 2 * t * (h * e + e * v)
    if head == "lm":
        return 2 * t * h * v
    if head == "discriminator":
        return 2 * t * (h * h + h)
    if head == "classification":
        if F.family_for_config({"model_type": config.model_type}).kind == "decoder":
            return 2 * t * h * v
        return 2 * h * h + 2 * h * int(getattr(config, "num_labels", 2) or 2)
    return 0


def head_of(model) -> str | None:
    """The `head_flops` name of ``model``'s head: ``"mlm"`` (an LM head tied to an encoder's
    embeddings), ``"lm"`` (a decoder), ``"discriminator"`` (ELECTRA's pre-training head),
    ``"classification"`` (a classifier) or None (a bare encoder)."""
    config = getattr(model, "config", None)
    if config is not None and F.family_for_config({"model_type": config.model_type}).kind == "decoder":
        return "lm"
    if hasattr(model, "discriminator_predictions"):
        return "discriminator"
    if hasattr(model, "lm_head"):
        return "mlm"
    if hasattr(model, "classifier"):
        return "classification"
    return None


def train_flops(config_or_model, seq_len: int = 128, batch: int = 1, *, head="auto",
                lm_head: bool | None = None) -> int:
    """FLOPs of one training step on ``batch`` sequences of ``seq_len`` tokens: three times the
    forward FLOPs of the layers, the embedding projection (when the embedding width differs from
    the hidden size) and ``head`` (see `head_flops` and the module doc).

    ``head="auto"`` reads the head from a model (`head_of`); with a bare config it means
    ``"mlm"`` for an encoder and ``"lm"`` for a decoder (pre-training).  ``lm_head`` (when not
    None) overrides ``head``: True is the LM head at every position (``"mlm"`` for an encoder,
    ``"lm"`` for a decoder), False no head.
    """
    config = getattr(config_or_model, "config", config_or_model)
    decoder = F.family_for_config({"model_type": config.model_type}).kind == "decoder"
    if lm_head is not None:
        head = ("lm" if decoder else "mlm") if lm_head else None
    elif head == "auto":
        head = head_of(config_or_model) if config_or_model is not config else ("lm" if decoder else "mlm")
    t, h = int(seq_len), config.hidden_size
    forward = sum(layer_flops(config, i, t) for i in range(config.num_hidden_layers))
    e = getattr(config, "embedding_width", h)
    if e != h:
        forward += 2 * t * e * h                          # embedding projection
    forward += head_flops(config, t, head)
    return int(3 * batch * forward)
