"""Structured head + FFN-neuron pruning to a FLOPs budget (instead of a sparsity).

Units are attention heads (a head's q/k/v columns and biases and its o rows, the `heads`
pattern) and FFN neurons (ffn_in column and bias, ffn_out row, `ffn_neurons`), read from the
model's family description (`shrink.unit_params`).  Each unit gets a score (`unit_scores`:
magnitude ``sum |w|`` or Taylor saliency ``sum |w * grad|`` over the unit's weights); within each
layer's heads and each layer's neurons the scores are divided by their mean (per-group
normalisation, as the ``global`` distribution does), then units are removed lowest score first
until the FLOPs per example of the SHRUNK model (`efficient_nlp.models.flops.forward_flops` of
`shrink.shrunk_config`, exact: FLOPs are linear in the head count and FFN width of each layer) are at or below the target
(`flops_structure`).  The result is a `shrink` structure; its masks (`shrink.structure_masks`)
can be kept fixed while fine-tuning (`pruning(masks=...)`).
"""
from __future__ import annotations

import numpy as np

from efficient_nlp import models
from efficient_nlp.models import family as F
from efficient_nlp.prune.shrink import flops, full_structure, gated_ffn, shrunk_config, unit_params


def unit_scores(model, element_scores=None) -> dict:
    """``{"heads": [per layer array [N_i]], "neurons": [per layer array [I_i]]}``: the sum over each
    unit's weights of ``|w|`` (magnitude) or of ``element_scores`` (``{parameter name: array}``,
    e.g. the accumulated Taylor saliency ``sum_t |w * g_t|`` of `taylor_scores`)."""
    params = {k: np.asarray(v.get_value(), np.float64) for k, v in models.named_params(model).items()}
    out = {"heads": [], "neurons": []}
    for i in range(F.num_layers(model)):
        unit = {"heads": F.head_layout(model, i).head_dim, "neurons": 1}
        for kind, members in unit_params(model, i).items():
            total = 0.0
            for name, axis in members:
                s = np.abs(params[name]) if element_scores is None else np.abs(
                    np.asarray(element_scores[name], np.float64))
                per = s.sum(axis=tuple(a for a in range(s.ndim) if a != axis))
                total = total + per.reshape(-1, unit[kind]).sum(-1)
            out[kind].append(total)
    return out


def unit_flops(config, seq_len: int = 128, gated: bool | None = None) -> tuple[int, int]:
    """FLOPs per example removed with one head / one FFN neuron (as counted by
    `efficient_nlp.models.flops.layer_flops`; ``gated`` as in `shrink.flops`)."""
    t, h, d = seq_len, config.hidden_size, config.attention_head_dim
    ffn_matmuls = 3 if (gated_ffn(config) if gated is None else gated) else 2
    return 2 * t * h * d * 4 + 2 * t * t * d * 2, 2 * t * h * ffn_matmuls


def flops_structure(model, target, *, seq_len: int = 128, scores=None, normalize: bool = True):
    """The `shrink` structure whose model has at most ``target`` FLOPs per example.

    ``target``: a fraction of the dense FLOPs (``0 < target <= 1``) or an absolute count (> 1).
    ``scores``: `unit_scores` output (default: magnitude).  Returns ``(structure, flops_after)``;
    removing one unit fewer would exceed the target.  Raises ValueError for a target below the
    FLOPs with every head and neuron removed (layers of LayerNorms only + the dense after them).
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
    ``batches`` (first-order Taylor saliency, Molchanov et al. 2019); ``loss_fn(model, batch, rngs)``."""
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
