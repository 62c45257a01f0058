"""Jitted pieces of a model that receive only the parameters they read.

A dynamic runner calls one jitted function per layer (or per group of layers) and decides on the
host in between.  Passing the whole parameter state to each call costs time per leaf on every
call (flattening and dispatch), which for a small layer is comparable to the layer itself.  A
`Segment` finds once, by tracing ``body(model, inputs)``, which state leaves it reads, and its
calls pass only those; the others are zeros inside the trace, unread and compiled away.

    pieces = compile_segments(model, body, 6, first_inputs, chain)   # body(model, s, inputs), s = 0..5
    hidden, logits = pieces[0](ids, types, mask)
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp.train.evaluate import eval_mode


def _used_leaves(full, shapes, inputs) -> tuple[int, ...]:
    """Indices of the state leaves (``shapes``) that ``full(leaves, inputs)`` reads (from its
    jaxpr), plus every leaf of an extended dtype (RNG keys: no zeros stand in for them)."""
    jaxpr = jax.make_jaxpr(full)(list(shapes), inputs).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return tuple(i for i, (v, leaf) in enumerate(zip(jaxpr.invars[:len(shapes)], shapes))
                 if id(v) in read or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended))


def _segment_fn(graphdef, treedef, shapes, body: Callable, s: int, inputs):
    """``(used, jitted fn(used_leaves, inputs), output shapes)`` of ``body(model, s, inputs)``."""
    def full(leaves, inputs):
        return body(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), s, inputs)

    used = _used_leaves(full, shapes, inputs)

    def run(used_leaves, inputs):
        given = dict(zip(used, used_leaves))
        return full([given[i] if i in given else jnp.zeros(t.shape, t.dtype) for i, t in enumerate(shapes)],
                    inputs)

    return used, jax.jit(run), jax.eval_shape(full, list(shapes), inputs)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, treedef, shapes: tuple, body: Callable, count: int, chain: Callable, first_inputs) -> tuple:
    out, inputs = [], first_inputs
    for s in range(count):
        used, fn, out_shape = _segment_fn(graphdef, treedef, shapes, body, s, inputs)
        out.append((used, fn))
        inputs = chain(out_shape, first_inputs)
    return tuple(out)


class Segment:
    """One jitted piece: ``segment(*inputs)`` runs its body on the parameters it reads."""

    def __init__(self, fn, params):
        self._fn, self.params = fn, params

    def __call__(self, *inputs):
        return self._fn(self.params, inputs)


def compile_segments(model, body: Callable, count: int, first_inputs, chain: Callable) -> list[Segment]:
    """One `Segment` per ``body(model, s, inputs)``, ``s = 0 .. count-1`` (``body`` and ``chain``:
    module-level functions) on ``model`` in eval mode.  ``first_inputs``: the first body's inputs as
    ``jax.ShapeDtypeStruct``s (any batch and length: the leaves read do not depend on them);
    ``chain(previous output shapes, first_inputs)`` gives the next body's inputs.  Runners of one
    model structure share the traced functions (and so XLA's compilations)."""
    graphdef, state = nnx.split(eval_mode(model))
    leaves, treedef = jax.tree.flatten(state)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
    return [Segment(fn, tuple(leaves[i] for i in used))
            for used, fn in _compiled(graphdef, treedef, shapes, body, int(count), chain, tuple(first_inputs))]


__all__ = ["Segment", "compile_segments"]
