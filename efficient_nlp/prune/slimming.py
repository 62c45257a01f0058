"""EarlyBERT-style slimming (Chen et al. 2021; docs/pruning.md): learnable scalar gates on every
attention head and every FFN neuron, an L1 penalty on the gates, and pruning of the units with
the smallest gates once the gate mask has stabilised (the "early-bird" ticket).

Gates act on the parameters, not on the modules (the attention module is untouched): the
attention output dense (the ``o`` site of the model family) is linear in the concatenated head
contexts, ``out = sum_h ctx_h @ W_O[rows of h]``, so scaling head ``h``'s context by ``g_h``
equals scaling the ``head_dim`` rows of the ``o`` kernel that belong to ``h``; likewise an FFN
neuron gate scales its row of the ``ffn_out`` kernel.  `apply_gates` is therefore a pure
function of ``(params, gates)`` usable inside any loss, and `Slimming` wraps a model with the
gates as extra ``nnx.Param`` so that the one training step trains weights and gates together.

Gates pytree: ``{"heads": {"<layer>": [num_heads]}, "ffn": {"<layer>": [intermediate]}}``
(either part may be absent).  The search (`earlybert_search`): every ``check_every`` updates the
gate masks (the ``head_sparsity`` / ``ffn_sparsity`` fraction of units with the smallest ``|g|``
removed, per layer or globally) are recomputed; the normalised Hamming distance to the previous
check (`mask_distance`) is recorded; the search stops once the last ``window`` distances are all
below ``threshold`` (`stabilized`).  `gate_structure` turns the final masks into the structure
that `efficient_nlp.prune.shrink` removes for real.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import tree as tree_lib
from efficient_nlp.models import family as F
from efficient_nlp.prune import masks as masks_lib
from efficient_nlp.prune.patterns import family_name, get_pattern, param_site


def init_gates(model, *, heads: bool = True, ffn: bool = True, value: float = 1.0) -> dict:
    """Gates of ``model`` (a model of `efficient_nlp.models` whose family has the ``o`` and
    ``ffn_out`` sites), all equal to ``value``."""
    F.family_of(model).require("o", "ffn_out", what="slimming gates")
    n = F.num_layers(model)
    out = {}
    if heads:
        out["heads"] = {str(i): jnp.full((F.head_layout(model, i).num_heads,), value, jnp.float32) for i in range(n)}
    if ffn:
        out["ffn"] = {str(i): jnp.full((F.num_neurons(model, i),), value, jnp.float32) for i in range(n)}
    return out


def apply_gates(params, gates, head_dim: int, family=None):
    """``params`` with the rows of each head of the ``o`` kernel scaled by its head gate and each
    row of the ``ffn_out`` kernel by its neuron gate (equal to scaling the head context / the FFN
    activation; see the module docstring).  The layer of a kernel is the last index of its
    path before the site; ``family``: a family name (None: the sites of any family, as for
    `patterns.param_site`).  Pure; differentiable in params and gates."""
    head_g, ffn_g = gates.get("heads", {}), gates.get("ffn", {})
    family = family_name(family)

    def leaf(path, w):
        site = param_site(tree_lib.path_str(path), family)
        if site is None or site.leaf != "kernel":
            return w
        layer = site.prefix.rpartition(".")[2]
        if site.role == "o" and layer in head_g:
            return w * jnp.repeat(head_g[layer], head_dim).astype(w.dtype)[:, None]
        if site.role == "ffn_out" and layer in ffn_g:
            return w * ffn_g[layer].astype(w.dtype)[:, None]
        return w

    return jax.tree_util.tree_map_with_path(leaf, params)


def l1_penalty(gates, l1_heads: float = 0.0, l1_ffn: float = 0.0):
    """``l1_heads * sum |g_heads| + l1_ffn * sum |g_ffn|``."""
    total = jnp.zeros((), jnp.float32)
    for part, lam in (("heads", l1_heads), ("ffn", l1_ffn)):
        if part in gates and not (isinstance(lam, (int, float)) and lam == 0):  # lam may be traced
            total = total + lam * sum(jnp.sum(jnp.abs(g)) for g in gates[part].values())
    return total


class Slimming(nnx.Module):
    """``model`` plus its gates as ``nnx.Param`` (``.gates``), so `train.fit` / `train.run`
    train both.  ``gated()`` is the model with the gates folded into its parameters."""

    def __init__(self, model, *, heads: bool = True, ffn: bool = True, value: float = 1.0):
        self.model = model
        self.head_dim = int(F.head_layout(model).head_dim)
        self.family = F.family_of(model).name
        g = init_gates(model, heads=heads, ffn=ffn, value=value)
        self.head_gates = nnx.List([nnx.Param(v) for _, v in sorted(g.get("heads", {}).items(), key=_idx)])
        self.ffn_gates = nnx.List([nnx.Param(v) for _, v in sorted(g.get("ffn", {}).items(), key=_idx)])

    @property
    def gates(self) -> dict:
        out = {}
        if len(self.head_gates):
            out["heads"] = {str(i): p[...] for i, p in enumerate(self.head_gates)}
        if len(self.ffn_gates):
            out["ffn"] = {str(i): p[...] for i, p in enumerate(self.ffn_gates)}
        return out

    def gated(self):
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        return nnx.merge(graphdef, apply_gates(params, self.gates, self.head_dim, self.family), rest)

    def __call__(self, *args, **kwargs):
        return self.gated()(*args, **kwargs)


def _idx(item):
    return int(item[0])


def slimming_loss(loss_fn: Callable, l1_heads: float = 1e-4, l1_ffn: float = 1e-4) -> Callable:
    """``loss(slim, batch, rngs) = loss_fn(slim.gated(), batch, rngs) + L1(gates)`` for a
    `Slimming`; aux gets ``gate_l1`` (the penalty)."""

    def loss(slim, batch, rngs):
        value, aux = loss_fn(slim.gated(), batch, rngs)
        pen = l1_penalty(slim.gates, l1_heads, l1_ffn)
        return value + pen, {**(aux or {}), "gate_l1": pen}

    return loss


# ----------------------------------------------------------------------------- gate masks
def gate_masks(gates, head_sparsity: float = 0.0, ffn_sparsity: float = 0.0, distribution="uniform"):
    """Keep masks like ``gates``: the ``head_sparsity`` (``ffn_sparsity``) fraction of units with the
    smallest ``|g|`` removed, per layer (``"uniform"``) or over all layers (``"global"``, raw
    gate values compared: the gates share one scale).  Exactly ``round(s * n)`` are removed."""
    rules = []
    for part, s in (("heads", head_sparsity), ("ffn", ffn_sparsity)):
        if part in gates:
            rules.append((rf"^{part}\.", masks_lib.PruneRule(get_pattern("unstructured"), float(s),
                                                              distribution, normalize=False)))
    plan = masks_lib.make_plan(gates, rules)
    scores = {n: jnp.abs(g) for n, g in masks_lib.selected(gates, plan).items()}
    return masks_lib.to_tree(gates, plan, masks_lib.compute_masks(plan, scores))


def mask_distance(a, b) -> float:
    """Normalised Hamming distance between two masks pytrees (fraction of differing entries)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = sum(int(np.sum(np.asarray(x) != np.asarray(y))) for x, y in zip(la, lb))
    return diff / max(sum(np.size(x) for x in la), 1)


def stabilized(distances, threshold: float = 0.05, window: int = 3) -> bool:
    """True once the last ``window`` mask distances are all below ``threshold`` (Early-Bird /
    EarlyBERT: the mask has stopped changing)."""
    return len(distances) >= window and max(distances[-window:]) < threshold


def gate_structure(model, masks) -> dict:
    """The `shrink` structure that keeps the units whose gate mask is True (all layers kept;
    an ungated part keeps everything)."""
    from efficient_nlp.prune.shrink import full_structure
    st = full_structure(model)
    if "heads" in masks:
        st["heads"] = [[int(h) for h in np.flatnonzero(np.asarray(masks["heads"][str(i)]))] for i in st["layers"]]
    if "ffn" in masks:
        st["neurons"] = [[int(j) for j in np.flatnonzero(np.asarray(masks["ffn"][str(i)]))] for i in st["layers"]]
    return st


@dataclasses.dataclass
class SearchResult:
    structure: dict        # for prune.shrink(model, structure=...)
    masks: Any             # gate masks at the end of the search
    gates: Any             # gate values at the end of the search
    steps: int             # updates run
    distances: list        # mask distance at each check after the first
    stable: bool           # the mask stabilised before max_steps
    model: Any = None      # the searched model (weights trained with the gates; gates not folded)
    losses: list = dataclasses.field(default_factory=list)


def earlybert_search(model, loss_fn, batches, *, config, head_sparsity: float = 0.3,
                     ffn_sparsity: float = 0.4, l1_heads: float = 1e-4, l1_ffn: float = 1e-4,
                     distribution: str = "uniform", check_every: int = 10, threshold: float = 0.05,
                     window: int = 3, max_steps: int | None = None, optimizer=None) -> SearchResult:
    """Trains ``model`` with gates + L1 and stops once the gate mask stabilises.

    One compiled step (`train.run`) runs all updates; every ``check_every`` updates its
    callback recomputes the masks, compares them with the previous ones and stops the run once
    they have stabilised.  ``max_steps`` (default ``config.train.num_steps``) bounds the
    search.  ``batches(0)`` feeds it; update ``t`` uses the dropout key of ``config.train.seed``
    and ``t``, as in ``train.fit``.
    """
    from efficient_nlp import train as train_lib

    opts = train_lib.train_options(config)
    max_steps = int(max_steps or opts.num_steps)
    if check_every < 1 or window < 1:
        raise ValueError("check_every and window must be >= 1")
    slim = Slimming(model, heads=head_sparsity > 0, ffn=ffn_sparsity > 0)
    if not slim.gates:
        raise ValueError("earlybert_search: head_sparsity and ffn_sparsity are both 0: nothing to prune")
    tx = optimizer or train_lib.make_optimizer(config, max_steps)
    distances, last = [], {"masks": None, "stable": False}

    def check(progress):
        if progress.step % check_every and progress.step != max_steps:
            return False
        masks = jax.device_get(gate_masks(progress.model().gates, head_sparsity, ffn_sparsity, distribution))
        if last["masks"] is not None:
            distances.append(mask_distance(last["masks"], masks))
            last["stable"] = stabilized(distances, threshold, window)
        last["masks"] = masks
        return last["stable"]

    final, history = train_lib.run(slim, slimming_loss(loss_fn, l1_heads, l1_ffn), tx, batches(0),
                                   steps=max_steps, seed=opts.seed, mesh=train_lib.make_mesh(), callback=check)
    gates = jax.device_get(final.gates)
    masks = jax.device_get(gate_masks(gates, head_sparsity, ffn_sparsity, distribution))
    return SearchResult(gate_structure(model, masks), masks, gates, len(history), distances, last["stable"],
                        final.model, [r["loss"] for r in history])
