"""Wall-clock latency of a forward pass (or any call), alone or side by side.

    seconds = measure_latency(model, token_batch(model.config.vocab_size, 8, 128))
    before, after = compare_latency([model, small], batch, repeats=10, rounds=3)

A model is timed through a jitted forward (`efficient_nlp.models.family.forward` for a batch
dict, ``model(*inputs)`` otherwise); a plain callable is timed as it is (jit it yourself), each
call waited for (``block_until_ready`` on its outputs).  Warm-up calls (compilation) are not
timed; the result is the median.  `compare_latency` alternates the candidates in rounds so
that drifts in machine load hit them alike.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from efficient_nlp.models import family as F


def token_batch(vocab_size: int, batch_size: int = 8, seq_len: int = 128, seed: int = 0) -> dict:
    """Random token ids in ``[1, vocab_size)`` and an all-ones attention mask (int32 numpy)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1, vocab_size, (batch_size, seq_len)).astype(np.int32),
            "attention_mask": np.ones((batch_size, seq_len), np.int32)}


def _forward_output(out):
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs):
    model = nnx.merge(graphdef, state)
    if isinstance(inputs, Mapping):
        return _forward_output(F.forward(model, inputs))
    return _forward_output(model(*inputs))


def as_callable(fn_or_model, inputs=()) -> Callable[[], Any]:
    """A no-argument callable that runs ``fn_or_model`` on ``inputs`` and waits for it.

    ``inputs``: a batch dict (models: `family.forward`) or a tuple of positional arguments
    (a single array is one argument)."""
    if not isinstance(inputs, (Mapping, tuple, list)):
        inputs = (inputs,)
    if isinstance(fn_or_model, nnx.Module):
        graphdef, state = nnx.split(fn_or_model)
        inputs = jax.tree.map(jax.numpy.asarray, inputs if isinstance(inputs, Mapping) else tuple(inputs))
        return lambda: jax.block_until_ready(_forward(graphdef, state, inputs))
    if isinstance(inputs, Mapping):
        return lambda: jax.block_until_ready(fn_or_model(inputs))
    return lambda: jax.block_until_ready(fn_or_model(*inputs))


def compare_latency(fns_or_models: Sequence, inputs=(), repeats: int = 20, warmup: int = 3,
                    rounds: int = 3, settle: bool = False) -> list[float]:
    """Median seconds per call of each candidate, timed in alternating rounds.

    Every candidate first runs ``warmup`` untimed calls; then, ``rounds`` times, each runs
    ``repeats`` timed calls in turn (``settle``: one untimed call at the start of each block,
    after the other candidates' blocks).  ``inputs`` are shared (see `as_callable`)."""
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    calls = [as_callable(f, inputs) for f in fns_or_models]
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(rounds):
        for call, record in zip(calls, times):
            if settle:
                call()
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                record.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def measure_latency(fn_or_model, inputs=(), repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn_or_model`` on ``inputs`` (``warmup`` untimed calls
    first; see `as_callable`)."""
    return compare_latency([fn_or_model], inputs, repeats, warmup, rounds=1)[0]
