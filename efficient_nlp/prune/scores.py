"""Pruning criteria (docs/pruning.md, "Scores" table): pure score functions.

A score says how much a weight matters; pruning removes the LOWEST scores.  Each criterion is
offered twice:

* a pure one-step function ``fn(params, grads) -> scores`` (`magnitude_score`,
  `movement_score`, `saliency_score`, `random_score`), pytree in, pytree out;
* a `Criterion` ``(init, accumulate, score)`` used by the optax wrapper
  (`efficient_nlp.prune.pruning`), whose statistics live in the optimizer state:
  ``stats = init(params)``; every update ``stats = accumulate(stats, params, grads)``;
  at a pruning step ``scores = score(params, stats)``.

Only leaves that a pruning rule selects carry statistics; the wrapper passes the selected
leaves only (a dict ``{name: array}``), so the criteria are written for any pytree.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from efficient_nlp.prune._registry import resolve


# ----------------------------------------------------------------------------- one-step scores
def magnitude_score(params, grads=None):
    """Magnitude (0th order): ``|w|`` (Han et al. 2015, Zhu & Gupta 2017)."""
    del grads
    return jax.tree.map(jnp.abs, params)


def movement_score(params, grads):
    """Movement (1st order), one step: ``-grad * w`` (Sanh et al. 2020).

    Summed over steps (`movement`) it is large for weights moving AWAY from zero, which survive.
    """
    return jax.tree.map(lambda w, g: -g * w, params, grads)


def saliency_score(params, grads):
    """Saliency / first-order Taylor, one step: ``|w * grad|`` (Molchanov et al. 2019)."""
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


def random_score(params, key):
    """Uniform random scores in [0, 1) (the random-pruning baseline); one key per leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = [jax.random.fold_in(key, i) for i in range(len(leaves))]
    return jax.tree.unflatten(
        treedef, [jax.random.uniform(k, jnp.shape(w), jnp.float32) for k, w in zip(keys, leaves)])


# ----------------------------------------------------------------------------- criteria with state
class Criterion(NamedTuple):
    """A score with statistics kept across steps (a pytree, may be empty).

    ``restore(params, stats) -> values`` (optional): the value a pruned weight comes back with
    when the masks revive it (default: 0, the value it is stored with while pruned)."""

    name: str
    init: Callable[[Any], Any]
    accumulate: Callable[[Any, Any, Any], Any]
    score: Callable[[Any, Any], Any]
    restore: Callable[[Any, Any], Any] | None = None


def _zeros(params):
    return jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)


def _no_stats(params):
    return ()


def magnitude() -> Criterion:
    """``|w|`` of the current weights; no statistics."""
    return Criterion("magnitude", _no_stats, lambda s, p, g: s, lambda p, s: magnitude_score(p))


def movement(learning_rate: float | None = None, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8) -> Criterion:
    """Movement pruning (Sanh et al. 2020): weights moving away from zero get high
    scores and survive.

    ``learning_rate=None``: ``S = -sum_t grad_t * W_t`` accumulated since the start of training.
    A float: Sanh et al.'s learned scores.  ``S`` is a parameter of the straight-through top-k
    (``W' = W * TopK(S)``) whose gradient ``dL/dS = grad_t * W_t`` is followed by Adam at that
    constant rate (their default 1e-2, 100x or more the weights' rate, which they decay with
    the weights' schedule; ``b1``, ``b2``, ``eps`` as in Adam, with bias correction).  Adam divides by the gradient's running RMS, so ``S`` ranks by
    how CONSISTENTLY ``-grad * W`` is positive rather than by its summed size.

    As in Sanh et al.'s straight-through estimator, ``grad_t`` is the gradient of the loss with
    respect to the masked weight ``W * M`` (nonzero for pruned weights too) and ``W_t`` is the
    DENSE weight: a pruned weight keeps the value it had when it was pruned (the masked gradient
    never moves it).  The wrapper stores pruned weights as exact zeros, so the statistics keep
    that value: per leaf ``stack([S, W_ref])`` with ``W_ref`` the last nonzero value of ``w``
    (learned scores add Adam's moments and the step count: ``stack([S, W_ref, m, v, t])``).
    A pruned weight's score therefore keeps moving, and when the masks revive it, it comes back
    with ``W_ref`` (`Criterion.restore`) instead of 0."""
    learned = learning_rate is not None
    if learned and not float(learning_rate) > 0:
        raise ValueError(f"movement(learning_rate=...) must be > 0 (Sanh et al. use 1e-2), got {learning_rate!r}")

    def init(params):
        def one(w):
            z = jnp.zeros(jnp.shape(w), jnp.float32)
            return jnp.stack([z, jnp.asarray(w, jnp.float32)] + ([z, z, z] if learned else []))
        return jax.tree.map(one, params)

    def accumulate(stats, params, grads):
        def one(st, w, g):
            ref = jnp.where(w != 0, w.astype(jnp.float32), st[1])
            d = g.astype(jnp.float32) * ref  # dL/dS: the score's straight-through gradient
            if not learned:
                return jnp.stack([st[0] - d, ref])
            m, v, t = b1 * st[2] + (1 - b1) * d, b2 * st[3] + (1 - b2) * d * d, st[4] + 1
            step = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
            return jnp.stack([st[0] - learning_rate * step, ref, m, v, t])
        return jax.tree.map(one, stats, params, grads)

    return Criterion("movement", init, accumulate, lambda p, s: jax.tree.map(lambda st: st[0], s),
                     lambda p, s: jax.tree.map(lambda st, w: st[1].astype(w.dtype), s, p))


def saliency() -> Criterion:
    """Taylor saliency ``sum_t |w_t * grad_t|`` accumulated since the start (Molchanov et al. 2019)."""
    def accumulate(stats, params, grads):
        return jax.tree.map(lambda s, w, g: s + jnp.abs(w * g).astype(jnp.float32), stats, params, grads)

    return Criterion("saliency", _zeros, accumulate, lambda p, s: s)


def random(seed: int = 0) -> Criterion:
    """Random scores, fixed for the whole run (so gradual random masks only grow)."""
    key = jax.random.key(seed)
    return Criterion("random", _no_stats, lambda s, p, g: s, lambda p, s: random_score(p, key))


CRITERIA = {"magnitude": magnitude, "movement": movement, "saliency": saliency,
            "taylor": saliency, "random": random}


def get_criterion(criterion, **kwargs) -> Criterion:
    """A `Criterion` from a name in `CRITERIA` (or a `Criterion`, returned as is)."""
    return resolve(CRITERIA, criterion, "pruning criterion", Criterion, **kwargs)
