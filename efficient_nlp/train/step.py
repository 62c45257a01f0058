"""The one training step of the library and a runner for short loops.

Functional NNX: a model is split into its ``graphdef``, the trainable variables (``params``,
``nnx.Param`` by default) and the rest; a `TrainState` holds them with the optimizer state
and the number of completed updates.  `make_step` builds the pure update

    step(graphdef, state, batch, key) -> (state, metrics)

from ``loss_fn(model, batch, rngs) -> (loss, aux)``: gradients of the loss with respect to
the trainable variables, one optax update, the non-trainable variables as the model left
them (batch statistics, counters, RNG streams).  ``metrics`` holds the ``aux`` values,
``loss``, ``grad_norm`` (global norm of the gradients before the optimizer) and ``nonfinite``
(True when the loss or the gradient norm is NaN / inf).

`compiled_step` is its jitted form, cached on ``(loss_fn, optimizer, trainable, mesh)`` and
the model's structure (without keeping ``loss_fn`` alive): a loop started many times with the
same objects and shapes (one per matmul in post-training quantization) compiles once.  `run`
runs it for short loops without checkpoints (reconstruction, layer solving, searches);
`train.fit` runs `make_step` with checkpoints, exact resume and evaluation.  Both report each
executed step to the compute meters of `efficient_nlp.train.compute`, when one is active
(`efficient_nlp.train.step_cost`).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import weakref
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp.train import distributed, step_cost


class TrainState(NamedTuple):
    """Everything a training loop carries. ``step``: completed updates (int32 scalar)."""
    step: Any
    params: Any
    rest: Any
    opt_state: Any


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm became NaN/inf at ``step``."""

    def __init__(self, step, message):
        self.step = int(step)
        super().__init__(message)


def copy_model(model):
    """An independent copy of ``model`` (``nnx.clone``): new Variables, so setting or updating one
    never changes the other (``merge(*split(m))`` would share them).  The immutable arrays are
    shared until replaced; `run` and ``fit`` copy buffers before donating them."""
    return nnx.clone(model)


def init_state(model, optimizer, trainable=nnx.Param, opt_state=None):
    """``(graphdef, TrainState)`` of ``model`` at step 0 (arrays are the model's own).

    ``opt_state``: the optimizer state to start from instead of ``optimizer.init(params)`` (e.g.
    Adam moments carried over from a smaller model); it must have the structure, shapes and
    dtypes of that init state (`check_opt_state`)."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError("nothing to train: the trainable filter selects no variable of the model")
    if opt_state is None:
        opt_state = optimizer.init(params)
    else:
        check_opt_state(opt_state, jax.eval_shape(optimizer.init, params))
    return graphdef, TrainState(np.zeros((), np.int32), params, rest, opt_state)


def check_opt_state(given, expected):
    """Raises ``ValueError`` naming the first difference between an optimizer state ``given``
    and the ``expected`` one (arrays or ``jax.ShapeDtypeStruct``): a leaf missing or extra (by
    path), another tree structure, or a leaf of another shape or dtype."""
    fix = ("pass the state of the same optimizer for a model with the same trainable parameters "
           "(for a grown model, grow the moments the same way)")
    got = jax.tree_util.tree_flatten_with_path(given)[0]
    want = jax.tree_util.tree_flatten_with_path(expected)[0]
    got_paths = {jax.tree_util.keystr(p): x for p, x in got}
    for path, x in want:
        key = jax.tree_util.keystr(path)
        if key not in got_paths:
            raise ValueError(f"opt_state does not match the optimizer's state: it has no leaf {key} "
                             f"(shape {tuple(np.shape(x))}); {fix}")
    want_paths = {jax.tree_util.keystr(p) for p, _ in want}
    extra = [k for k in got_paths if k not in want_paths]
    if extra:
        raise ValueError(f"opt_state does not match the optimizer's state: unexpected leaf {extra[0]}"
                         f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; {fix}")
    if jax.tree.structure(given) != jax.tree.structure(expected):
        raise ValueError(f"opt_state does not match the optimizer's state: same leaves but another tree "
                         f"structure ({str(jax.tree.structure(given))[:200]} instead of "
                         f"{str(jax.tree.structure(expected))[:200]}); {fix}")
    for path, x in want:
        key = jax.tree_util.keystr(path)
        y = got_paths[key]
        got_shape, got_dtype = tuple(np.shape(y)), jnp.result_type(y)
        if got_shape != tuple(x.shape) or got_dtype != x.dtype:
            raise ValueError(f"opt_state does not match the optimizer's state: leaf {key} is "
                             f"{got_dtype}{list(got_shape)}, the optimizer's is {x.dtype}{list(x.shape)}; {fix}")


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, trainable=nnx.Param):
    """The pure update ``step(graphdef, state, batch, key) -> (state, metrics)`` (module doc).

    ``loss_fn(model, batch, rngs) -> (loss, aux)`` runs on the merged model with
    ``rngs = nnx.Rngs(dropout=key)``; ``aux`` is a dict of arrays or None.  ``metrics`` holds
    the ``aux`` values as returned (tensors too: a pipelined loop may pass a module's outputs
    on), ``loss``, ``grad_norm`` and ``nonfinite``; `mean_metrics` averages them for logging.
    """
    def step(graphdef, state: TrainState, batch, key):
        def compute(params):
            # Fresh Variable objects for the non-trainable state, created at this trace level
            # so the model may update them (batch statistics, counters, RNG streams).
            rest = jax.tree.map(lambda x: x, state.rest)
            model = nnx.merge(graphdef, params, rest)
            loss, aux = loss_fn(model, batch, nnx.Rngs(dropout=key))
            _, _, new_rest = nnx.split(model, trainable, ...)
            return loss, (aux, new_rest)

        (loss, (aux, rest)), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**(aux or {}), "loss": loss, "grad_norm": grad_norm,
                   "nonfinite": ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))}
        return TrainState(state.step + 1, params, rest, opt_state), metrics

    return step


def mean_metrics(metrics: dict) -> dict:
    """Every metric as a float32 scalar (the mean of its values), ``nonfinite`` kept as it is:
    what the loops log."""
    return {k: v if k == "nonfinite" else jax.tree.map(lambda x: jnp.mean(jnp.asarray(x, jnp.float32)), v)
            for k, v in metrics.items()}


def _reduced_step(loss_fn, optimizer, trainable):
    step = make_step(loss_fn, optimizer, trainable)

    def reduced(graphdef, state, batch, key):
        state, metrics = step(graphdef, state, batch, key)
        return state, mean_metrics(metrics)

    return reduced


# loss_fn -> {(optimizer, trainable, sharding): jitted step}; an entry lives as long as its
# loss_fn.  The jitted steps do not hold loss_fn (nor what it holds): `_call` hands it to the
# trace through `_LOSS`.
_COMPILED = weakref.WeakKeyDictionary()
_PER_LOSS = 8  # jitted steps kept per loss_fn (the oldest is dropped)
_LOSS = contextvars.ContextVar("loss_fn")


def _current_loss(model, batch, rngs):
    return _LOSS.get()(model, batch, rngs)


def _call(fn, loss_fn, *args):
    token = _LOSS.set(loss_fn)
    try:
        return fn(*args)
    finally:
        _LOSS.reset(token)


def compiled_step(loss_fn: Callable, optimizer, trainable=nnx.Param, mesh=None):
    """`make_step` jitted: ``step(graphdef, state, batch, key) -> (state, metrics)`` with
    `mean_metrics`, ``state`` donated, outputs replicated over ``mesh`` (if given).

    Cached on ``loss_fn`` (by identity or equality, for as long as it lives), ``optimizer`` and
    ``trainable`` (by equality), and by JAX on the ``graphdef`` and shapes: pass the same
    function and optimizer objects to reuse the compilation (e.g. a module-level loss and one
    optimizer per learning rate), with per-run data in the batch or in the model.
    """
    sharding = None if mesh is None else distributed.replicated(mesh)
    key = (optimizer, trainable, sharding)
    try:
        per_loss = _COMPILED.setdefault(loss_fn, {})
        fn = per_loss.get(key)
    except TypeError:  # not weak-referenceable or not hashable: compiled for this call only
        per_loss, fn = None, None
    if fn is None:
        fn = jax.jit(_reduced_step(_current_loss, optimizer, trainable), static_argnums=0, donate_argnums=1,
                     out_shardings=None if sharding is None else (sharding, sharding))
        if per_loss is not None:
            if len(per_loss) >= _PER_LOSS:
                per_loss.pop(next(iter(per_loss)))
            per_loss[key] = fn
    return functools.partial(_call, fn, loss_fn)


def step_key(seed: int, step):
    """Dropout key of update ``step`` (1, 2, ...): ``fold_in(key(seed), step)``."""
    return jax.random.fold_in(jax.random.key(seed), step)


@dataclasses.dataclass
class Progress:
    """What `run`'s callback sees after update ``step``.  The arrays are valid during the call
    only (the next update reuses their buffers): copy what you keep."""

    step: int
    metrics: dict
    state: TrainState
    graphdef: Any

    def model(self):
        """The model after this update."""
        return nnx.merge(self.graphdef, self.state.params, self.state.rest)


def run(model, loss_fn: Callable, optimizer, batches: Iterable, *, steps: int, trainable=nnx.Param,
        seed: int = 0, mesh=None, callback: Callable[[Progress], Any] = None):
    """``steps`` updates of ``model`` on ``batches`` without checkpoints: ``(model, history)``.

    For short optimisations (reconstruction, layer solving, searches); `train.fit` adds
    checkpoints, exact resume, metrics files and evaluation.  Update ``t`` (1 ... steps) uses
    the ``t``-th batch and the dropout key ``fold_in(key(seed), t)``, as in ``fit``.

    Args:
      model: an NNX module (left untouched; the trained copy is returned).
      loss_fn: ``loss_fn(model, batch, rngs) -> (loss, aux)`` (see `make_step`).
      optimizer: an optax transformation (a schedule inside it sees update counts 0, 1, ...).
      batches: iterable of batches (pytrees of arrays with a leading batch axis); with a mesh,
        each process feeds its own rows as in ``fit``.
      trainable: NNX filter of the variables that get gradients.
      mesh: a mesh with a ``data`` axis: state replicated, batches sharded over it (data
        parallel); default: the first local device.
      callback: ``callback(Progress)`` after every update; a true return value stops early.

    Returns:
      The trained model (a new module) and ``history``: one dict per update, ``{"step": t,
      "loss", "grad_norm", aux values}`` as floats.

    Raises:
      NonFiniteLossError: the loss or gradient norm was NaN/inf (names the first such step).
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    mesh = mesh or distributed.make_mesh(jax.local_devices()[:1])
    graphdef, state = init_state(model, optimizer, trainable)
    state = distributed.replicate(state, mesh)  # new buffers: donating them leaves the model intact
    step_fn = compiled_step(loss_fn, optimizer, trainable, mesh)
    jitted = step_fn.args[0]
    step_fn = step_cost.metered(step_fn, batch_argnum=2, lower=functools.partial(_call, jitted.lower, loss_fn),
                                model=model, devices=mesh.size, cache_key=jitted)
    iterator = iter(batches)
    records = []
    for t in range(1, steps + 1):
        try:
            host_batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out before update {t} of {steps}") from None
        batch = distributed.shard_batch(host_batch, mesh)
        key = distributed.replicate(step_key(seed, t), mesh)
        state, metrics = step_fn(graphdef, state, batch, key)
        records.append(metrics)
        if callback is not None and callback(Progress(t, metrics, state, graphdef)):
            break
    history = []
    if records:  # one transfer per metric
        series = distributed.to_host(jax.tree.map(lambda *xs: jnp.stack(xs), *records))
        step_fn.synced()
        for i in range(len(records)):
            values = jax.tree.map(lambda v: v[i].item(), series)
            if values.pop("nonfinite"):
                raise NonFiniteLossError(i + 1, f"non-finite loss or gradient at update {i + 1} (loss="
                                                f"{values['loss']}, grad_norm={values['grad_norm']}); lower the "
                                                "learning rate")
            history.append({"step": i + 1, **values})
    return nnx.merge(graphdef, state.params, state.rest), history
