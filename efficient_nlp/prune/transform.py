"""Pruning as optax transformations; masks live in the optimizer state.

`pruning` wraps any optax optimizer (the jaxpruner design, written anew here): the masks, the
criterion statistics and the step count are part of the optimizer state, so the trainer's
checkpointing (orbax) and replication over the mesh cover them with nothing extra.  Per update:

1. gradients of pruned weights are zeroed (``where(mask, g, 0)``);
2. the criterion statistics are accumulated (e.g. movement ``-g * w``);
3. the inner optimizer runs;
4. on a schedule step the masks are recomputed from the scores of the updated weights;
5. inner-optimizer moments (every state subtree shaped like the params, e.g. Adam's mu / nu)
   of re-grown weights (pruned before, kept now) are reset to zero; a re-grown weight restarts
   from 0, or from the criterion's `Criterion.restore` value (movement: its value when pruned);
6. masks are applied after the update: the returned update sends every pruned weight to
   exactly 0 (``update = -w``), so pruned weights stay exactly zero.

Proximal operators (chain them AFTER the base optimizer, they need ``params``):
`l1_soft_threshold` (``w <- sign(w) max(|w| - lr*lambda, 0)``) and `group_soft_threshold`
(``w_g <- w_g max(0, 1 - lr*lambda / ||w_g||)`` over rows / heads / neurons of a pattern).

Every transform here takes its arguments in one order: the wrapped optimizer (if any), then
``rules`` (regexes over parameter paths, selected through `efficient_nlp.tree`), then the
hyper-parameters: ``pruning(inner, rules, ...)``, ``l1_soft_threshold(rules, strength, ...)``,
``group_soft_threshold(rules, strength, ...)``.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from efficient_nlp import tree as tree_lib
from efficient_nlp.prune import masks as masks_lib
from efficient_nlp.prune.patterns import Pattern
from efficient_nlp.prune.schedules import fixed, get_schedule, one_shot
from efficient_nlp.prune.scores import get_criterion


class PruningState(NamedTuple):
    """``count``: completed updates; ``masks``: pytree like params (bool, scalar True where not
    pruned); ``stats``: criterion statistics (like params, scalar 0 elsewhere; () if none)."""

    count: Any
    masks: Any
    stats: Any
    inner_state: Any


def _need_params(params, what):
    if params is None:
        raise ValueError(f"{what} needs params: call tx.update(grads, state, params)")


def _check_rules(rules, what):
    if isinstance(rules, (int, float)):
        raise TypeError(f"{what}(rules, strength, learning_rate): rules come first, got the number {rules!r}")


def _has_stats(stats):
    return not (isinstance(stats, tuple) and len(stats) == 0)


def _map_param_like(fn, state, params_treedef):
    """Applies ``fn`` to every subtree of ``state`` with the structure of the params."""
    is_p = lambda x: jax.tree.structure(x) == params_treedef  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if is_p(x) else x, state, is_leaf=is_p)


def pruning(inner: optax.GradientTransformation, rules, *, criterion="magnitude",
            schedule=None, reset_regrown: bool = True, masks=None,
            regrow: bool = True) -> optax.GradientTransformation:
    """Wraps ``inner`` so that it prunes the parameters ``rules`` select.

    Args:
      inner: the base optimizer (e.g. ``train.make_optimizer(config, num_steps)``).
      rules: ``[(regex, PruneRule)]`` (see `efficient_nlp.prune.rule`).
      criterion: a name in `scores.CRITERIA` or a `Criterion`.
      schedule: a `Schedule` (default: `one_shot` at init).
      reset_regrown: zero inner moments of weights that come back.
      regrow: False makes masks monotone: a pruned unit gets score ``-inf`` at every later
        recompute, so it is never revived (a revived weight restarts from 0, having lost its
        pretrained value, unless the criterion restores it as movement does) and the sparsity
        stays exact.
      masks: initial masks (a pytree like params, or ``{name: bool array}``) used from init
        instead of scores; with ``schedule=None`` they are then kept for the whole run
        (`schedules.fixed`).  Parameters they set to False should already be zero (the first
        update zeroes them otherwise).
    """
    crit = get_criterion(criterion)
    if schedule is not None:
        sched = get_schedule(schedule)
    else:
        sched = fixed() if masks is not None else one_shot(0)
    given = None
    if masks is not None:
        flat = isinstance(masks, dict) and all(isinstance(k, str) and not isinstance(v, Mapping)
                                               for k, v in masks.items())
        given = dict(masks) if flat else dict(tree_lib.named_leaves(masks))

    def init(params):
        plan = masks_lib.make_plan(params, rules)
        sel = masks_lib.selected(params, plan)
        raw_stats = crit.init(sel)
        stats = masks_lib.to_tree(params, plan, raw_stats, fill=0.0) if _has_stats(raw_stats) else ()
        named = {n: jnp.ones(jnp.shape(w), bool) for n, w in sel.items()}
        with jax.ensure_compile_time_eval():  # init may run under jit (train.fit does)
            at_init = bool(sched.update(0))
        if given is not None:
            missing = sorted(n for n in sel if n not in given or jnp.ndim(given[n]) == 0)
            if missing:
                raise ValueError(f"pruning(masks=...): no mask for selected parameters {missing[:4]}")
            named = {n: jnp.broadcast_to(jnp.asarray(given[n], bool), jnp.shape(w)) for n, w in sel.items()}
        elif at_init:
            named = masks_lib.compute_masks(plan, crit.score(sel, raw_stats), sched.progress(0))
        return PruningState(jnp.zeros((), jnp.int32), masks_lib.to_tree(params, plan, named),
                            stats, inner.init(params))

    def update(grads, state, params=None):
        _need_params(params, "pruning")
        plan = masks_lib.make_plan(params, rules)
        old = state.masks
        grads_m = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, old)
        stats = state.stats
        raw_stats = ()
        if _has_stats(stats):
            raw_stats = crit.accumulate(masks_lib.selected(stats, plan), masks_lib.selected(params, plan),
                                        masks_lib.selected(grads, plan))
            stats = masks_lib.to_tree(params, plan, raw_stats, fill=0.0)
        updates, inner_state = inner.update(grads_m, state.inner_state, params)
        new_params = optax.apply_updates(params, updates)
        count = state.count + 1

        def recompute(_):
            sel = masks_lib.selected(new_params, plan)
            scores = crit.score(sel, raw_stats)
            if not regrow:
                kept = masks_lib.selected(old, plan)
                scores = {n: jnp.where(kept[n], s.astype(jnp.float32), -jnp.inf) for n, s in scores.items()}
            named = masks_lib.compute_masks(plan, scores, sched.progress(count))
            return masks_lib.to_tree(params, plan, named)

        new = jax.lax.cond(sched.update(count), recompute, lambda _: old, None)
        if reset_regrown:
            regrown = jax.tree.map(lambda n, o: n & ~o, new, old)
            inner_state = _map_param_like(
                lambda sub: jax.tree.map(lambda v, r: jnp.where(r, jnp.zeros((), v.dtype), v), sub, regrown),
                inner_state, jax.tree.structure(params))
        updates = jax.tree.map(lambda u, w, m: jnp.where(m, u, -w), updates, params, new)
        if crit.restore is not None and _has_stats(stats):
            back = masks_lib.to_tree(params, plan, crit.restore(masks_lib.selected(params, plan), raw_stats),
                                     fill=0.0)
            updates = jax.tree.map(lambda u, w, n, o, v: jnp.where(n & ~o, v - w, u), updates, params, new, old,
                                   back)
        return updates, PruningState(count, new, stats, inner_state)

    return optax.GradientTransformation(init, update)


def get_masks(opt_state):
    """The masks pytree of the first `PruningState` found in ``opt_state`` (None if none)."""
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruningState)):
        if isinstance(node, PruningState):
            return node.masks
    return None


# ----------------------------------------------------------------------------- proximal operators
class ProxState(NamedTuple):
    count: Any


def _lr(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate, jnp.float32)


def soft_threshold(w, t):
    """The proximal operator of ``t * ||w||_1``: ``sign(w) * max(|w| - t, 0)``."""
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - t, 0.0).astype(w.dtype)


def group_shrink(members, pattern: Pattern, t):
    """The proximal operator of ``t * sum_g ||w_g||_2`` (group soft threshold) on the tensors of
    ONE pattern group: ``members = {name: array}`` (e.g. one layer's Q/K/V/O kernels for
    `heads`, or a single kernel for `neurons`); unit ``g`` gathers its entries over all members,
    ``w_g <- w_g max(0, 1 - t / ||w_g||)``.  ``t`` is a scalar (may be traced)."""
    sq = sum(pattern.reduce(n, jnp.square(w.astype(jnp.float32))) for n, w in members.items())
    norm = jnp.sqrt(sq)
    factor = jnp.where(norm > 0, jnp.maximum(0.0, 1.0 - t / jnp.where(norm > 0, norm, 1.0)), 0.0)
    return {n: w * pattern.expand(n, factor, jnp.shape(w)).astype(w.dtype) for n, w in members.items()}


def l1_soft_threshold(rules, strength: float, learning_rate=1.0) -> optax.GradientTransformation:
    """Proximal L1 step on the leaves ``rules`` select (e.g. ``r"kernel$"``): after the base
    update ``w' = w + u``, ``w <- sign(w') max(|w'| - lr * strength, 0)`` (ISTA).
    ``learning_rate``: float or schedule of the count; chain after the base optimizer."""
    _check_rules(rules, "l1_soft_threshold")
    tree_lib.compile_rules(rules)  # validate early

    def init(params):
        return ProxState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        _need_params(params, "l1_soft_threshold")
        sel = tree_lib.select(params, rules)
        t = _lr(learning_rate, state.count) * strength
        out = jax.tree.map(lambda u, w, s: (soft_threshold(w + u, t) - w) if s else u, updates, params, sel)
        return out, ProxState(state.count + 1)

    return optax.GradientTransformation(init, update)


def group_soft_threshold(rules, strength: float, learning_rate=1.0) -> optax.GradientTransformation:
    """Proximal group-lasso step (``t * sum_g ||w_g||_2``): ``w_g <- w_g max(0, 1 - t / ||w_g||)``
    with ``t = lr * strength``; groups are the units of a pattern, ``rules = [(regex, Pattern)]``
    (e.g. ``heads(D)`` groups a head's q/k/v columns and o rows, ``neurons()`` kernel columns)."""
    _check_rules(rules, "group_soft_threshold")
    if isinstance(rules, tuple) and len(rules) == 2 and isinstance(rules[0], str):
        rules = [rules]
    prune_rules = []
    for regex, pat in rules:
        if not isinstance(pat, Pattern) or pat.local:
            raise ValueError(f"group_soft_threshold: rule {regex!r} needs a structured Pattern, got {pat!r}")
        prune_rules.append((regex, masks_lib.PruneRule(pat, 0.0, "uniform")))

    def init(params):
        masks_lib.make_plan(params, prune_rules)  # validate early
        return ProxState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        _need_params(params, "group_soft_threshold")
        plan = masks_lib.make_plan(params, prune_rules)
        t = _lr(learning_rate, state.count) * strength
        new = jax.tree.map(lambda w, u: w + u, params, updates)
        sel = masks_lib.selected(new, plan)
        out = {}
        for g in plan.groups.values():
            pat = plan.rules[g.rule][1].pattern
            out.update(group_shrink({n: sel[n] for n in g.members}, pat, t))
        shrunk = masks_lib.to_tree(params, plan, out, fill=jnp.nan)

        def pick(path, u, w, s):
            name = tree_lib.path_str(path)
            return (s - w) if name in out else u

        result = jax.tree_util.tree_map_with_path(pick, updates, params, shrunk)
        return result, ProxState(state.count + 1)

    return optax.GradientTransformation(init, update)
