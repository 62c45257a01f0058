"""Structured head + FFN-neuron pruning to a FLOPs budget (instead of a sparsity).

Units are attention heads (a head's Q/K/V columns and biases and its O rows, the `heads`
pattern) and FFN neurons (intermediate column and bias, output row, `ffn_neurons`).  Each unit
gets a score (`unit_scores`: magnitude ``sum |w|`` or Taylor saliency ``sum |w * grad|`` over the
unit's weights); within each layer's heads and each layer's neurons the scores are divided by
their mean (per-group normalisation, as the ``global`` distribution does), then units are removed
lowest score first until the FLOPs per example of the SHRUNK model (`shrink.flops` of
`shrink.shrunk_config`, exact: FLOPs are linear in the head count and FFN width of each layer)
are at or below the target (`flops_structure`).  The result is a `shrink` structure; its masks
(`shrink.structure_masks`) can be kept fixed while fine-tuning (`pruning(masks=...)`).
"""
from __future__ import annotations

import numpy as np

from efficient_nlp import models
from efficient_nlp.prune.shrink import flops, full_structure, shrunk_config

_HEAD_PARAMS = ("attention.query.kernel", "attention.key.kernel", "attention.value.kernel",
                "attention.query.bias", "attention.key.bias", "attention.value.bias", "attention.output.kernel")
_NEURON_PARAMS = ("ffn.intermediate.kernel", "ffn.intermediate.bias", "ffn.output.kernel")


def _unit_axis(rest):
    if rest in ("attention.output.kernel", "ffn.output.kernel") or rest.endswith(".bias"):
        return 0
    return 1


def unit_scores(model, element_scores=None) -> dict:
    """``{"heads": [per layer array [N_i]], "neurons": [per layer array [I_i]]}``: the sum over each
    unit's weights of ``|w|`` (magnitude) or of ``element_scores`` (``{parameter name: array}``,
    e.g. the accumulated Taylor saliency ``sum_t |w * g_t|`` of `taylor_scores`)."""
    d = model.config.attention_head_dim
    params = {k: np.asarray(v.get_value(), np.float64) for k, v in models.named_params(model).items()}
    out = {"heads": [], "neurons": []}
    for i in range(len(model.bert.encoder.layers)):
        p = f"bert.encoder.layers.{i}."
        for kind, names, unit in (("heads", _HEAD_PARAMS, d), ("neurons", _NEURON_PARAMS, 1)):
            total = 0.0
            for rest in names:
                w = params[p + rest]
                s = np.abs(w) if element_scores is None else np.abs(np.asarray(element_scores[p + rest], np.float64))
                axis = _unit_axis(rest)
                per = s.sum(axis=tuple(a for a in range(s.ndim) if a != axis))
                total = total + per.reshape(-1, unit).sum(-1)
            out[kind].append(total)
    return out


def unit_flops(config, seq_len: int = 128) -> tuple[int, int]:
    """FLOPs per example removed with one head / one FFN neuron (as counted by `shrink.flops`)."""
    t, h, d = seq_len, config.hidden_size, config.attention_head_dim
    return 2 * t * h * d * 4 + 2 * t * t * d * 2, 2 * t * h * 2


def flops_structure(model, target, *, seq_len: int = 128, scores=None, normalize: bool = True):
    """The `shrink` structure whose model has at most ``target`` FLOPs per example.

    ``target``: a fraction of the dense FLOPs (``0 < target <= 1``) or an absolute count (> 1).
    ``scores``: `unit_scores` output (default: magnitude).  Returns ``(structure, flops_after)``;
    removing one unit fewer would exceed the target.  Raises ValueError for a target below the
    FLOPs with every head and neuron removed (embeddings-only layers + pooler).
    """
    cfg = model.config
    dense = flops(cfg, seq_len)
    budget = float(target) * dense if float(target) <= 1.0 else float(target)
    st = full_structure(model)
    floor = flops(shrunk_config(cfg, {"layers": st["layers"], "heads": [[] for _ in st["layers"]],
                                      "neurons": [[] for _ in st["layers"]]}), seq_len)
    if budget < floor:
        raise ValueError(f"FLOPs target {target!r} ({budget:.4g}) is below {floor} (every head and FFN neuron "
                         f"removed; the dense model has {dense})")
    scores = scores if scores is not None else unit_scores(model)
    head_cost, neuron_cost = unit_flops(cfg, seq_len)
    units = []  # (normalised score, kind order, layer, index)
    for kind, cost in (("heads", head_cost), ("neurons", neuron_cost)):
        for i, s in enumerate(scores[kind]):
            s = np.asarray(s, np.float64)
            if normalize and s.size:
                s = s / (np.mean(np.abs(s)) + 1e-12)
            units += [(float(v), kind, i, j, cost) for j, v in enumerate(s)]
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    removed = {"heads": [set() for _ in st["layers"]], "neurons": [set() for _ in st["layers"]]}
    current = dense
    for _, kind, i, j, cost in units:
        if current <= budget:
            break
        removed[kind][i].add(j)
        current -= cost
    out = {"layers": list(st["layers"]),
           "heads": [[h for h in hs if h not in removed["heads"][i]] for i, hs in enumerate(st["heads"])],
           "neurons": [[n for n in ns if n not in removed["neurons"][i]] for i, ns in enumerate(st["neurons"])]}
    after = flops(shrunk_config(cfg, out), seq_len)
    if after != current:  # pragma: no cover - the per-unit costs and shrink.flops must agree
        raise AssertionError(f"flops_structure: incremental count {current} != flops of the shrunk config {after}")
    return out, int(after)


def taylor_scores(model, loss_fn, batches, num_batches: int = 8, seed: int = 0) -> dict:
    """``{parameter name: sum_t |w * g_t|}`` over ``num_batches`` batches of the iterator
    ``batches`` (first-order Taylor saliency, METHODS.md 2.1); ``loss_fn(model, batch, rngs)``."""
    import jax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def saliency(params, batch, key):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, nnx.Rngs(dropout=key))[0])(params)
        return jax.tree.map(lambda w, g: jax.numpy.abs(w * g), params, grads)

    from efficient_nlp import tree as tree_lib
    total = None
    for t, batch in zip(range(num_batches), batches):
        s = saliency(params, batch, jax.random.fold_in(jax.random.key(seed), t))
        total = s if total is None else jax.tree.map(lambda a, b: a + b, total, s)
    if total is None:
        raise ValueError("taylor_scores: no batches")
    return {n: np.asarray(v) for n, v in tree_lib.named_leaves(total)}
