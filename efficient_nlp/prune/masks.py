"""Masks from scores: rules, sparsity distributions (global / uniform / ERK / custom).

Masks are pytrees matching the parameters (docs/contracts.md): a boolean leaf per selected parameter
(True = kept) and a scalar ``True`` for every other leaf (it broadcasts, so ``where(mask, w, 0)``
works on the whole tree and unselected leaves cost nothing in the optimizer state).

A pruning rule is ``(regex, PruneRule)``: the regex selects parameters (`efficient_nlp.tree`, first
matching rule wins) and the `PruneRule` gives ONE pattern, the target sparsity and its
distribution over the rule's groups (a group = a tensor, or the tensors a pattern ties together,
e.g. one layer's attention for `heads`):

* ``"global"``: one ranking of all units of the rule; each group's unit scores are divided by
  their mean absolute value first (per-tensor normalisation, ``normalize=True``) so tensors of
  different scale compete fairly;
* ``"uniform"``: every group loses the same fraction of its units;
* ``"erk"``: Erdos-Renyi-Kernel (Evci et al. 2020): density proportional to
  ``sum(shape) / prod(shape)``, scaled so the rule's total sparsity is the target;
* ``{group_regex: sparsity}``: a custom per-group map (groups it does not match get the rule's
  sparsity).

The number of units removed is ``round(target * n)``, so the sparsity reached at each schedule
step is exact; masks are computed by ranking (`topk_mask`), so a traced target is fine (jit).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp import tree as tree_lib
from efficient_nlp.prune.patterns import Pattern, PatternError, get_pattern, topk_mask

DISTRIBUTIONS = ("global", "uniform", "erk")


@dataclasses.dataclass(frozen=True)
class PruneRule:
    """What to do with the parameters one regex selects (see the module docstring)."""

    pattern: Pattern = dataclasses.field(default_factory=lambda: get_pattern("unstructured"))
    sparsity: float = 0.5
    distribution: Any = "global"
    normalize: bool = True


def rule(regex: str, pattern="unstructured", sparsity: float = 0.5, distribution="global",
         normalize: bool = True, **pattern_kwargs):
    """``(regex, PruneRule)`` with the pattern given by name + kwargs, e.g.
    ``rule(r"attention\\.(query|key|value|output)\\.kernel$", "heads", 0.5, "uniform", head_dim=32)``."""
    return (regex, PruneRule(get_pattern(pattern, **pattern_kwargs), float(sparsity), distribution,
                             bool(normalize)))


@dataclasses.dataclass
class Group:
    key: str
    rule: int
    members: list  # parameter names (flatten order)
    units: int
    size: int      # elements over all members
    dims: int      # sum of shape entries over all members (ERK)
    sparsity: float = 0.0  # static per-group target (uniform / erk / custom)


@dataclasses.dataclass
class Plan:
    """Static (shape-only) description of what the rules select; built by `make_plan`."""

    rules: list          # [(regex, PruneRule)]
    names: list          # selected parameter names, flatten order
    shapes: dict         # name -> shape
    rule_of: dict        # name -> rule index
    groups: dict         # key -> Group (insertion = flatten order)

    def rule_groups(self, i):
        return [g for g in self.groups.values() if g.rule == i]


def _check_sparsity(value, what):
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what}: target sparsity must be in [0, 1), got {value!r} (1.0 would remove "
                         "every unit)")


def _erk(groups, sparsity):
    """Per-group sparsities of Erdos-Renyi-Kernel for the total ``sparsity`` (Evci et al. 2020)."""
    size = np.array([g.size for g in groups], np.float64)
    raw = np.array([g.dims / max(g.size, 1) for g in groups], np.float64)
    dense = np.zeros(len(groups), bool)
    target = (1.0 - sparsity) * size.sum()
    for _ in range(len(groups) + 1):
        budget = target - size[dense].sum()
        eps = budget / max((raw * size)[~dense].sum(), 1e-30)
        over = (~dense) & (eps * raw > 1.0)
        if not over.any():
            break
        dense |= over
    density = np.where(dense, 1.0, np.clip(eps * raw, 0.0, 1.0))
    return [float(1.0 - d) for d in density]


def make_plan(params, rules) -> Plan:
    """Resolves ``rules`` (``[(regex, PruneRule)]``) against ``params`` (shapes only).

    Raises `efficient_nlp.tree.RuleError` (bad regex, a rule matching nothing), `PatternError`
    (a pattern that does not fit a tensor, tied tensors with different unit counts) or
    ValueError (impossible target sparsity, unknown distribution).
    """
    if isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str):
        rules = [rules]
    rules = list(rules)
    for i, r in enumerate(rules):
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[1], PruneRule)):
            raise ValueError(f"pruning rule {i} must be (regex, PruneRule) (see prune.rule), got {r!r}")
    found = tree_lib.match(params, [(regex, i) for i, (regex, _) in enumerate(rules)])
    shapes = {n: tuple(np.shape(leaf)) for n, leaf in tree_lib.named_leaves(params)}
    names = [n for n in shapes if n in found]
    rule_of = {n: found[n].payload for n in names}
    groups: dict[str, Group] = {}
    for n in names:
        i = rule_of[n]
        pr = rules[i][1]
        shape = shapes[n]
        pr.pattern.check(n, shape)
        key = pr.pattern.group_key(n, shape)
        units = int(np.prod(jax.eval_shape(lambda x: pr.pattern.reduce(n, x),
                                           jax.ShapeDtypeStruct(shape, jnp.float32)).shape))
        g = groups.get(key)
        if g is None:
            groups[key] = Group(key, i, [n], units, int(np.prod(shape)), int(sum(shape)))
        else:
            if g.rule != i:
                raise PatternError(f"{n} (rule {i}) is tied to {g.members} (rule {g.rule}) by its pattern; "
                                   "select the tensors of one group with one rule")
            if g.units != units:
                raise PatternError(f"{n} has {units} units but the tensors tied to it ({g.members}) have "
                                   f"{g.units}")
            g.members.append(n)
            g.size += int(np.prod(shape))
            g.dims += int(sum(shape))
    for i, (regex, pr) in enumerate(rules):
        if pr.pattern.local:
            continue
        _check_sparsity(pr.sparsity, f"rule {i} {regex!r}")
        gs = [g for g in groups.values() if g.rule == i]
        dist = pr.distribution
        if isinstance(dist, Mapping):
            compiled = []
            for rx, s in dist.items():
                try:
                    compiled.append((re.compile(rx), s))
                except re.error as e:
                    raise tree_lib.RuleError(f"rule {i}: custom sparsity regex {rx!r} is invalid: {e}") from None
                _check_sparsity(s, f"rule {i} custom sparsity for {rx!r}")
            for g in gs:
                g.sparsity = float(next((s for rx, s in compiled if rx.search(g.key)), pr.sparsity))
        elif dist == "uniform" or dist == "global":
            for g in gs:
                g.sparsity = float(pr.sparsity)
        elif dist == "erk":
            for g, s in zip(gs, _erk(gs, float(pr.sparsity))):
                g.sparsity = s
        else:
            raise ValueError(f"rule {i}: unknown distribution {dist!r}; use one of {DISTRIBUTIONS} or a "
                             "{group_regex: sparsity} dict")
    return Plan(rules, names, shapes, rule_of, groups)


def _count(sparsity, n):
    """Units to remove: round(sparsity * n) (traced sparsity ok)."""
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)


def _finite_mean_abs(u):
    """Mean ``|u|`` over the finite entries (``-inf`` marks units that must stay pruned)."""
    finite = jnp.isfinite(u)
    return jnp.sum(jnp.where(finite, jnp.abs(u), 0.0)) / jnp.maximum(jnp.sum(finite), 1)


def compute_masks(plan: Plan, scores: Mapping[str, Any], progress=1.0) -> dict:
    """``{name: bool keep-mask}`` for every selected parameter.

    ``scores``: ``{name: score array}`` (higher = more important); ``progress`` in [0, 1] scales
    every target sparsity (a schedule's ramp; may be traced).  Local patterns (N:M) apply in full
    once ``progress >= 1`` and keep everything before.
    """
    progress = jnp.asarray(progress, jnp.float32)
    out = {}
    for i, (_, pr) in enumerate(plan.rules):
        gs = plan.rule_groups(i)
        pat = pr.pattern
        if pat.local:
            for g in gs:
                for n in g.members:
                    out[n] = pat.mask(scores[n]) | (progress < 1.0)
            continue
        unit_scores = []
        for g in gs:
            u = sum(pat.reduce(n, scores[n].astype(jnp.float32)) for n in g.members).reshape(-1)
            unit_scores.append(u)
        if pr.distribution == "global":
            if pr.normalize:
                unit_scores = [u / (_finite_mean_abs(u) + 1e-12) for u in unit_scores]
            flat = jnp.concatenate(unit_scores)
            keep = topk_mask(flat, _count(pr.sparsity * progress, flat.shape[0]))
            offsets = np.cumsum([0] + [u.shape[0] for u in unit_scores])
            keeps = [keep[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        else:
            keeps = [topk_mask(u, _count(g.sparsity * progress, u.shape[0])) for g, u in zip(gs, unit_scores)]
        for g, k in zip(gs, keeps):
            for n in g.members:
                unit_shape = jax.eval_shape(lambda x: pat.reduce(n, x),
                                            jax.ShapeDtypeStruct(plan.shapes[n], jnp.float32)).shape
                out[n] = pat.expand(n, k.reshape(unit_shape), plan.shapes[n])
    return out


def selected(params, plan: Plan) -> dict:
    """``{name: leaf}`` of the parameters the plan selects."""
    return {n: leaf for n, leaf in tree_lib.named_leaves(params) if n in plan.rule_of}


def to_tree(params, plan: Plan, named: Mapping[str, Any], fill=True):
    """A pytree like ``params`` with ``named[name]`` at selected leaves and scalar ``fill`` elsewhere."""
    def leaf(path, _):
        name = tree_lib.path_str(path)
        return named[name] if name in named else jnp.asarray(fill)
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_masks(params, rules, scores=None, progress=1.0):
    """One-shot masks pytree for ``params``: ``scores`` is a pytree like params (default: the
    magnitude ``|w|``) or a ``{name: array}`` dict."""
    plan = make_plan(params, rules)
    if scores is None:
        named = {n: jnp.abs(w) for n, w in selected(params, plan).items()}
    elif isinstance(scores, Mapping) and all(isinstance(k, str) and "." in k for k in scores):
        named = dict(scores)
    else:
        named = selected(scores, plan)
    return to_tree(params, plan, compute_masks(plan, named, progress))


def apply_masks(params, masks):
    """``where(mask, w, 0)`` leaf by leaf (masks broadcast: a scalar True keeps the leaf)."""
    return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), params, masks)


def sparsity(masks_or_params, *, of_masks: bool | None = None) -> float:
    """Fraction of zero entries over all non-scalar leaves (masks: False entries)."""
    zeros = total = 0
    for leaf in jax.tree.leaves(masks_or_params):
        a = np.asarray(leaf)
        if a.ndim == 0:
            continue
        zeros += int(a.size - np.count_nonzero(a))
        total += a.size
    return zeros / max(total, 1)
