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
