"""Memory of one training step as XLA plans it, split into what the step holds.

    mem = train.step_memory(model, loss_fn, optax.adamw(1e-4), batch, trainable=peft.trainable(model))
    mem["peak_bytes"], mem["trainable_bytes"], mem["optimizer_bytes"], mem["frozen_bytes"]

``peak_bytes`` is XLA's own plan of the compiled step (`jax.stages.Compiled.memory_analysis`:
arguments + outputs + temporaries - aliased buffers), the same on every run and unaffected by
other processes, so two variants of one model compare exactly; the CPU backend reports it, as do
GPU and TPU.  The argument part is split into the trainable parameters, the optimizer state
(only the trainable leaves have one) and the frozen rest of the model (a packed base, masks,
non-trainable statistics).  It is not the process's resident memory (which also holds compiled
code, the data pipeline and the Python heap).
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from efficient_nlp.train.step import _reduced_step, init_state, step_key


def _nbytes(x) -> int:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return int(np.size(x)) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    """Bytes of the arrays of a pytree (any dtype, random keys as their key data)."""
    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def count_params(model, filter_=nnx.Param) -> int:
    """Elements of the variables of ``model`` that ``filter_`` selects (default: every
    ``nnx.Param``; a layer shared by several positions counts once)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, filter_))))


def step_memory(model, loss_fn, optimizer, batch, trainable=nnx.Param) -> dict[str, int]:
    """Planned memory of the jitted update ``make_step(loss_fn, optimizer, trainable)`` on
    ``batch`` (compiled, not run): ``peak_bytes`` (arguments + outputs + temporaries - aliased),
    ``temp_bytes`` (activations kept for the backward pass, gradients, workspace),
    ``argument_bytes``, and the parts of the state: ``trainable_bytes``, ``optimizer_bytes``,
    ``frozen_bytes``; also ``trainable_params`` (elements)."""
    graphdef, state = init_state(model, optimizer, trainable)
    step = jax.jit(_reduced_step(loss_fn, optimizer, trainable), static_argnums=0, donate_argnums=1)
    stats = step.lower(graphdef, state, batch, step_key(0, 1)).compile().memory_analysis()
    if stats is None:  # pragma: no cover - a backend without memory analysis
        raise RuntimeError(f"the {jax.default_backend()} backend does not report compiled memory")
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)
    return {"peak_bytes": int(peak), "temp_bytes": int(stats.temp_size_in_bytes),
            "argument_bytes": int(stats.argument_size_in_bytes),
            "trainable_bytes": tree_bytes(state.params), "optimizer_bytes": tree_bytes(state.opt_state),
            "frozen_bytes": tree_bytes(state.rest),
            "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(state.params)))}
