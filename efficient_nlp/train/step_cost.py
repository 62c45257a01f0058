"""The cost of each executed training step: its FLOPs, examples and tokens, reported to the active
compute meters (`efficient_nlp.train.compute.Meter`).

``train.fit`` and ``train.run`` wrap their jitted step with `metered`; a `MeteredStep` reports
every call to the meters of the enclosing ``with Meter(...)`` blocks (`current_meters`) and does
nothing more outside one.

**FLOPs.**  The FLOPs of a step come from XLA's cost analysis of the jitted step (`xla_flops`),
computed once per compiled signature (batch shapes) and cached: the step is lowered again after
its first call, which JAX answers from its cache, and the lowered module's analysis needs no
compilation; where a backend only analyses compiled programs (``Lowered.cost_analysis`` is not
implemented there) the compiled executable JAX already holds for the step is asked, so nothing
is compiled twice.  XLA counts ``2 m n k`` per matmul plus the elementwise work.  When no
analysis is available the FLOPs model of `efficient_nlp.models.flops.train_flops` is used
(`model_flops`: three forward passes, the backward pass costing about twice the forward, as in
Kaplan et al. 2020).

**Timing.**  The first call of a signature waits for the device so its compilation stays out of
the timed steps; afterwards steps are timed from the end of that call to the points where the
loop waits for the device anyway (``MeteredStep.synced``: logging, evaluation, the end), so no
step is synchronised for the meter.  Examples are the leading dimension of the batch, tokens the
size of ``batch["input_ids"]`` (`batch_size_of`).
"""
from __future__ import annotations

import contextvars
import time
import weakref
from typing import Callable

import jax


# ----------------------------------------------------------------------------- FLOPs
def cost_flops(cost) -> float | None:
    """The ``flops`` entry of a cost analysis: a dict, or a list of per-program dicts (older JAX);
    None when absent or not positive."""
    if cost is None:
        return None
    if isinstance(cost, (list, tuple)):
        values = [cost_flops(c) for c in cost]
        values = [v for v in values if v is not None]
        return float(sum(values)) if values else None
    try:
        flops = float(cost.get("flops", 0.0))
    except (AttributeError, TypeError, ValueError):
        return None
    return flops if flops > 0 else None


def xla_flops(lower: Callable, args, devices: int = 1) -> tuple[float | None, str]:
    """``(flops, source)`` of one call of a jitted function from XLA's cost analysis.

    ``lower(*args)`` is the function's ``lower`` (``args`` may be ``jax.ShapeDtypeStruct``);
    after the function ran with these shapes JAX returns its cached lowering.  The lowered
    module's analysis (the whole program, no compilation) is preferred; where the backend does
    not implement it, the compiled executable's analysis (JAX's cached executable; it describes
    one device's share of a program partitioned over ``devices``, so it is multiplied by
    ``devices``).  ``(None, reason)`` when neither is available.
    """
    try:
        lowered = lower(*args)
    except Exception as e:  # noqa: BLE001 - accounting never stops training
        return None, f"lowering failed ({type(e).__name__}: {e})"
    try:
        flops = cost_flops(lowered.cost_analysis())
        if flops is not None:
            return flops, "XLA cost analysis"
    except Exception:  # noqa: BLE001
        pass
    try:
        flops = cost_flops(lowered.compile().cost_analysis())
    except Exception as e:  # noqa: BLE001
        return None, f"no XLA cost analysis ({type(e).__name__}: {e})"
    if flops is None:
        return None, "XLA cost analysis reported no FLOPs"
    if devices > 1:
        return flops * devices, f"XLA cost analysis (compiled per-device program x {devices} devices)"
    return flops, "XLA cost analysis"


def model_flops(model, batch) -> tuple[float | None, str]:
    """``(flops, source)`` of one training step of ``model`` on ``batch`` from the FLOPs model
    (`efficient_nlp.models.flops.train_flops`); ``(None, reason)`` when it does not apply."""
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    if model is None or getattr(model, "config", None) is None or ids is None or len(ids.shape) != 2:
        return None, "no XLA cost analysis, and the FLOPs model needs a model with a config and input_ids [B, T]"
    try:
        from efficient_nlp.models.flops import train_flops
        return float(train_flops(model, ids.shape[1], ids.shape[0])), \
            "FLOPs model (3 x forward of the trained model's matmuls)"
    except Exception as e:  # noqa: BLE001
        return None, f"FLOPs model failed ({type(e).__name__}: {e})"


def batch_size_of(batch) -> tuple[int | None, int | None]:
    """``(examples, tokens)`` of a global batch: the leading dimension of its first leaf with one,
    and the size of ``batch["input_ids"]`` (None without it)."""
    examples = next((int(x.shape[0]) for x in jax.tree.leaves(batch) if getattr(x, "ndim", 0) >= 1), None)
    ids = batch.get("input_ids") if hasattr(batch, "get") else None
    tokens = int(ids.size) if ids is not None and hasattr(ids, "size") else None
    return examples, tokens


# ----------------------------------------------------------------------------- step reporting
# The active meters, innermost last: `efficient_nlp.train.compute.Meter` adds itself on entry.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("efficient_nlp_compute_meters", default=())
# jitted step -> {signature of all its arguments: (flops, source)}: `train.run` starts many short
# loops on the same cached step, whose FLOPs are then analysed once.
_FLOPS_CACHE = weakref.WeakKeyDictionary()


def current_meters() -> tuple:
    """The meters of the enclosing ``with Meter(...)`` blocks, innermost last."""
    return _ACTIVE.get()


def _abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class MeteredStep:
    """A training step that reports each call to the meters active when it was made (`metered`).

    ``step(*args)`` calls ``fn(*args)``; with no meter it does nothing else.  Otherwise each call
    counts one step with the FLOPs, examples and tokens of its batch signature (analysed on the
    first call of a signature, see the module doc).  The first call of a signature waits for the
    device (once per loop) so its compilation stays out of the timed steps.  ``synced()`` tells
    the meters that every step called so far has finished (the loop just waited for the device):
    it closes the timed interval that began with the first step after the previous ``synced``.
    """

    def __init__(self, fn: Callable, *, batch_argnum: int, lower: Callable | None = None, model=None,
                 devices: int = 1, cache_key=None):
        self._fn = fn
        self.meters = current_meters()
        self._batch_argnum = int(batch_argnum)
        self._lower = lower if lower is not None else getattr(fn, "lower", None)
        self._model = model
        self._devices = max(int(devices), 1)
        self._cache_key = cache_key
        self._infos = {}      # batch signature -> (examples, tokens, flops or None)
        self._open = None     # perf_counter() at the start of the timed interval
        self._timed = [0, 0, 0, 0.0, 0]  # steps, examples, tokens, flops, steps without flops

    def __call__(self, *args):
        if not self.meters:
            return self._fn(*args)
        batch = args[self._batch_argnum]
        key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
        info = self._infos.get(key)
        if info is None:
            return self._first_call(key, args, batch)
        if self._open is None:  # the device is idle (synced): the interval starts with this step
            self._open = time.perf_counter()
        out = self._fn(*args)
        self._count(info, timed=True)
        return out

    def synced(self):
        """Every step called so far has finished: closes the current timed interval."""
        if self._open is None or not self.meters:
            return
        seconds = time.perf_counter() - self._open
        steps, examples, tokens, flops, unknown = self._timed
        for meter in self.meters:
            meter._add_timed(seconds, self._devices, steps, examples, tokens, flops, unknown)
        self._open, self._timed = None, [0, 0, 0, 0.0, 0]

    # -- internals
    def _first_call(self, key, args, batch):
        jax.block_until_ready(args[:self._batch_argnum] + args[self._batch_argnum + 1:])
        self.synced()          # the steps before this one have finished
        specs = jax.tree.map(_abstract, args)
        out = self._fn(*args)  # compiles
        examples, tokens = batch_size_of(batch)
        flops, source = self._flops(specs, batch)
        info = self._infos[key] = (examples, tokens, flops, source)
        jax.block_until_ready(out)
        self._count(info, timed=False)
        self._open = time.perf_counter()  # the next steps are timed from here
        return out

    def _flops(self, specs, batch):
        cache = None
        if self._cache_key is not None:
            try:
                leaves, treedef = jax.tree.flatten(specs)
                signature = (tuple(leaves), treedef)
                hash(signature)
                cache = _FLOPS_CACHE.setdefault(self._cache_key, {})
                if signature in cache:
                    return cache[signature]
            except TypeError:
                cache = None
        result = (None, "the step has no lower()")
        if self._lower is not None:
            result = xla_flops(self._lower, specs, self._devices)
        if result[0] is None:
            reason = result[1]
            result = model_flops(self._model, batch)
            if result[0] is None:
                result = (None, f"{reason}; {result[1]}")
        if cache is not None:
            cache[signature] = result
        return result

    def _count(self, info, *, timed):
        examples, tokens, flops, source = info
        for meter in self.meters:
            meter._add_step(examples, tokens, flops, source)
        if timed:
            t = self._timed
            t[0] += 1
            t[1] += examples or 0
            t[2] += tokens or 0
            if flops is None:
                t[4] += 1
            else:
                t[3] += flops


def metered(fn: Callable, *, batch_argnum: int, lower: Callable | None = None, model=None, devices: int = 1,
            cache_key=None) -> MeteredStep:
    """``fn`` (a jitted training step) wrapped to report each call to the current meters.

    ``batch_argnum``: which argument is the (global) batch; ``lower``: the function's ``lower``
    (default ``fn.lower``); ``model``: what the FLOPs model counts when XLA gives no analysis;
    ``devices``: devices the step runs on (MFU); ``cache_key``: an object that keeps a step's
    FLOPs across loops (the jitted function of a cached step).  See `MeteredStep`.
    """
    return MeteredStep(fn, batch_argnum=batch_argnum, lower=lower, model=model, devices=devices,
                       cache_key=cache_key)


__all__ = ["MeteredStep", "batch_size_of", "cost_flops", "current_meters", "metered", "model_flops", "xla_flops"]
