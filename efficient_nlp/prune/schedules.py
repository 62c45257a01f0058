"""Pruning schedules (docs/pruning.md, "Schedules"): when to recompute masks, and how far.

A `Schedule` is a pair of jit-safe pure functions of ``count`` (completed updates, as in
optax): ``progress(count) -> [0, 1]`` (fraction of each rule's target sparsity) and
``update(count) -> bool`` (recompute the masks after this update).  ``count == 0`` is
``init``: a schedule that updates at 0 prunes from the start (one-shot).  Iterative magnitude
pruning with rewinding spans several training runs; it is `efficient_nlp.prune.lottery`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from efficient_nlp.prune._registry import resolve


class Schedule(NamedTuple):
    name: str
    progress: Callable
    update: Callable


def one_shot(step: int = 0) -> Schedule:
    """Prune to the full target once, after ``step`` updates (0: at init)."""
    step = int(step)
    if step < 0:
        raise ValueError(f"one_shot: step must be >= 0, got {step}")
    return Schedule("one_shot",
                    lambda c: (jnp.asarray(c) >= step).astype(jnp.float32),
                    lambda c: jnp.asarray(c) == step)


def gradual_cubic(begin_step: int, end_step: int, frequency: int = 100) -> Schedule:
    """Gradual pruning (Zhu & Gupta 2017): ``s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3)``
    for ``t0 <= t <= t1``, recomputing masks every ``frequency`` updates from ``t0`` and at ``t1``;
    0 before ``t0`` and the full target after ``t1``."""
    begin_step, end_step, frequency = int(begin_step), int(end_step), int(frequency)
    if not 0 <= begin_step < end_step or frequency < 1:
        raise ValueError(f"gradual_cubic needs 0 <= begin_step < end_step and frequency >= 1; got "
                         f"begin_step={begin_step}, end_step={end_step}, frequency={frequency}")
    span = float(end_step - begin_step)

    def progress(c):
        tau = jnp.clip((jnp.asarray(c, jnp.float32) - begin_step) / span, 0.0, 1.0)
        return 1.0 - (1.0 - tau) ** 3

    def update(c):
        c = jnp.asarray(c)
        inside = (c >= begin_step) & (c <= end_step)
        return (inside & ((c - begin_step) % frequency == 0)) | (c == end_step)

    return Schedule("gradual_cubic", progress, update)


def fixed() -> Schedule:
    """Never recompute: the masks given to `pruning` (``masks=``) are kept for the whole run
    (lottery-ticket rounds, masks chosen outside training such as a FLOPs budget)."""
    return Schedule("fixed", lambda c: jnp.ones((), jnp.float32), lambda c: jnp.zeros((), bool))


SCHEDULES = {"one_shot": one_shot, "gradual_cubic": gradual_cubic, "fixed": fixed}


def get_schedule(schedule, **kwargs) -> Schedule:
    """A `Schedule` from a name in `SCHEDULES` with keyword arguments (or a `Schedule`)."""
    return resolve(SCHEDULES, schedule, "pruning schedule", Schedule, **kwargs)
