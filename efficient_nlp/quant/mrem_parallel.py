"""Module-wise reconstruction error minimisation, parallel (MREM-P, docs/quantization.md).

    from efficient_nlp.quant.mrem_parallel import mrem_p
    qmodel, report, info = mrem_p(qmodel, teacher, calib, num_modules=4, steps=2000)   # a ptq.Reconstruction
    info["devices"], info["shared_devices"]     # where the modules ran

The partition, the module loss l_n and its forward are MREM-S's (`efficient_nlp.quant.mrem`:
``modules``, ``compare`` / ``ModuleLoss``); what differs is that all N modules train at once:

- Placement: module n lives on device n: its slice of the quantized and of the full-precision
  model (only its own layers; the embeddings with module 0, the head modules with the last),
  its Adam state and its input queue are committed to that device, and its update is
  a separate jitted step.  JAX's asynchronous dispatch therefore runs the N steps of one time
  step concurrently, one per device.  Explicit ``placement`` (device indices, one per module)
  needing more devices than exist is an error; with ``placement=None`` and fewer devices than
  modules the modules are assigned round-robin (several per device, which then run their steps
  one after another) and a line says so (also ``info["shared_devices"]``).
- Input queues: between modules n and n+1 a ring buffer on module n+1's device holds module
  n's outputs of the last ``queue_size`` (t0) steps, both streams (full-precision ``fp_in``
  and quantized ``q_in``, with the batch's attention mask): FIFO (the push at count c fills slot
  ``c mod t0``, overwriting the output of step c - t0).  Module n+1 draws each example of its
  batch uniformly, with replacement, from the examples in the filled slots (`queue_sample`);
  it never waits for module n's current step: the pushes of time step t are dispatched after
  all steps of time step t, so step t of module n+1 reads outputs of steps <= t-1.
- Sequential fill: during the first t0 time steps each module's push is dispatched right after
  its own step, before the next module's step (a pipeline fill: module n+1 sees module n's
  output of the same step); from step t0 on, the parallel order above.
- Gradients stay inside a module: the queue entries are data (each module has its own jitted
  step; `teacher_force` also stops the gradient), so nothing flows to a predecessor.
- Annealed teacher forcing: module n > 0's quantized input is
  ``f~ = lam_t * f_fp + (1 - lam_t) * f_q`` with ``lam_t = max(1 - t / T0, 0)``, ``T0 =
  teacher_forcing * steps`` (default 40 %); module 0 reads token ids (no forcing).  The
  quantized output pushed downstream is the module's output on ``f~`` (the forward of the loss).
- Defaults as published (Bai et al. 2022): 4 modules, 2,000 steps, Adam with lr 1e-4 decaying linearly to 0.
  ``queue_size`` (t0) has no published default here: 8 (our choice).

Report rows (one per module) match MREM-S's: ``loss_before`` / ``loss_after`` are l_n over the
whole calibration set with each module fed end to end by its (untrained / trained)
predecessors, so the two methods' numbers compare directly.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant import mrem, ptq


# ----------------------------------------------------------------------------- schedules
def forcing_lambda(step, anneal_steps):
    """``lam_t = max(1 - t / T0, 0)`` (docs/quantization.md, annealed teacher forcing); ``T0 <= 0``
    gives 0 (no forcing).  Works on Python numbers and on traced / numpy arrays."""
    if isinstance(anneal_steps, (int, float)) and anneal_steps <= 0:
        return 0.0 * step
    return jnp.maximum(1.0 - jnp.asarray(step, jnp.float32) / anneal_steps, 0.0)


def teacher_force(fp_in, q_in, lam):
    """The quantized module's input ``f~ = lam * f_fp + (1 - lam) * f_q``, as data: the gradient
    is stopped, so a module's loss never reaches its predecessor."""
    return jax.lax.stop_gradient(lam * fp_in + (1.0 - lam) * q_in)


# ----------------------------------------------------------------------------- queues
def queue_init(size: int, example: Mapping[str, jax.Array]) -> dict:
    """An empty ring buffer of ``size`` entries shaped like ``example`` (a dict of arrays)."""
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"queue size (t0) must be a positive int, got {size!r}")
    return {"items": {k: jnp.zeros((int(size),) + v.shape, v.dtype) for k, v in example.items()},
            "count": jnp.zeros((), jnp.int32)}


def queue_push(queue: dict, item: Mapping[str, jax.Array]) -> dict:
    """FIFO update: ``item`` goes to slot ``count mod size`` (overwriting the entry pushed
    ``size`` pushes ago); ``count`` counts every push."""
    slot = queue["count"] % next(iter(queue["items"].values())).shape[0]
    items = {k: jax.lax.dynamic_update_index_in_dim(v, item[k].astype(v.dtype), slot, 0)
             for k, v in queue["items"].items()}
    return {"items": items, "count": queue["count"] + 1}


def queue_sample(queue: dict, key) -> dict:
    """A batch (as many rows as one entry) drawn uniformly with replacement from the examples
    of the filled slots (all slots once ``count >= size``).  Push before sampling: an empty
    queue would return slot 0's zeros."""
    items = queue["items"]
    size, rows = next(iter(items.values())).shape[:2]
    filled = jnp.clip(queue["count"], 1, size)
    k_slot, k_row = jax.random.split(key)
    slot = jax.random.randint(k_slot, (rows,), 0, filled)
    row = jax.random.randint(k_row, (rows,), 0, rows)
    return {k: v[slot, row] for k, v in items.items()}


_push = jax.jit(queue_push)


# ----------------------------------------------------------------------------- placement
def place(num_modules: int, placement: Sequence[int] | None = None, devices=None):
    """``(device per module, shared)``.  ``placement``: device indices (into ``devices``,
    default ``jax.local_devices()``), one per module; ``None`` / empty: round-robin, module n on
    device ``n mod D`` (``shared`` is True when D < ``num_modules``)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices to place the modules on: pass devices=None (all local devices) or a non-empty list")
    if placement is None or len(placement) == 0:
        return [devices[i % len(devices)] for i in range(num_modules)], len(devices) < num_modules
    placement = [int(i) for i in placement]
    if len(placement) != num_modules:
        raise ValueError(f"placement {placement} names {len(placement)} devices for {num_modules} modules; "
                         "give one device index per module or leave it empty for round-robin")
    if min(placement) < 0 or max(placement) >= len(devices):
        raise ValueError(f"placement {placement} needs device index {max(placement)} but only {len(devices)} "
                         f"device(s) exist; leave placement empty (round-robin, modules share devices) or run "
                         "with more devices (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                         "jax starts)")
    return [devices[i] for i in placement], len(set(placement)) < num_modules


# ----------------------------------------------------------------------------- module slices
def _parts(model, mod: mrem.Module) -> list:
    """The submodules of ``model`` that belong to ``mod`` (layers, then the embeddings / the head
    modules at the ends), in a fixed order."""
    layers = F.layer_stack(model)
    out = [layers[i] for i in range(mod.start, mod.stop)]
    if mod.first:
        out.append(F.get_module(model, F.embeddings_path(model)))
    if mod.last:
        out += [F.get_module(model, p) for p in F.head_paths(model)]
    return out


def _layer_stack_path(model) -> str:
    fam = F.family_of(model)
    return fam.path(fam.layers)


def module_slice(model, mod: mrem.Module):
    """``(copy of model holding only module mod's parts, the same module renumbered from layer 0)``;
    `mrem.module_forward` on the slice with the renumbered module equals it on ``model``."""
    sub = train.copy_model(model)
    layers = F.layer_stack(sub)
    F.set_module(sub, _layer_stack_path(sub), nnx.List([layers[i] for i in range(mod.start, mod.stop)]))
    if not mod.first and not (mod.last and getattr(sub, "tied_head", False)):
        # a tied head reads the word embedding: the last module keeps a copy to read (module 0
        # owns the table; `_parts` writes it back from module 0 only)
        F.set_module(sub, F.embeddings_path(sub), None)
    if not mod.last:
        for path in F.head_paths(sub):
            F.set_module(sub, path, None)
    return sub, mrem.Module(mod.index, 0, mod.stop - mod.start, mod.first, mod.last)


# ----------------------------------------------------------------------------- the step
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _module_step(graphdef, loss_fn, optimizer, trainable, state, feed, key, t, lam):
    """One update of one module (`efficient_nlp.train.make_step`) on ``feed`` (a calibration
    batch for module 0, else its input queue, sampled with ``fold_in(key, t)``); returns the new
    state, the loss and the module's outputs on both streams (the next module's queue entry;
    ``None`` for the last)."""
    key = jax.random.fold_in(key, t)
    if "count" in feed:
        batch = queue_sample(feed, key)
        batch["q_in"] = teacher_force(batch["fp_in"], batch["q_in"], lam)
    else:
        batch = dict(feed)
    state, metrics = train.make_step(loss_fn, optimizer, trainable)(graphdef, state, batch, key)
    out = None if "q_out" not in metrics else {"attention_mask": batch["attention_mask"],
                                               "fp_in": metrics["fp_out"], "q_in": metrics["q_out"]}
    return state, metrics["loss"], out


class _Worker:
    """Module n's state, committed to its device."""

    def __init__(self, qmodel, teacher, mod: mrem.Module, device, seed: int, optimizer):
        q, local = module_slice(qmodel, mod)
        fp, _ = module_slice(teacher, mod)
        names = ptq.trainable_names(q, local.prefixes(q), root="q")
        if not names:
            raise ValueError(f"module {mod.index} (layers {mod.start}..{mod.stop - 1}) has nothing quantized to train")
        self.mod, self.local, self.device, self.count = mod, local, device, len(names)
        self.optimizer, self.trainable = optimizer, ptq.name_filter(names)
        self.graphdef, state = train.init_state(ptq.Pair(q, fp), optimizer, self.trainable)
        self.state = jax.device_put(state, device)
        self.loss_fn = mrem.ModuleLoss(local, outputs=not mod.last)
        self.key = jax.device_put(jax.random.fold_in(jax.random.key(seed), mod.index), device)
        self.queue = None   # input queue (modules after the first), created at the first push
        self.losses = []

    def step(self, feed, t: int, lam: float):
        put = functools.partial(jax.device_put, device=self.device)
        self.state, loss, out = _module_step(self.graphdef, self.loss_fn, self.optimizer, self.trainable, self.state,
                                             feed, self.key, put(np.int32(t)), put(np.float32(lam)))
        self.losses.append(loss)
        return out

    def push(self, item, size: int):
        item = jax.device_put(item, self.device)
        if self.queue is None:
            self.queue = jax.device_put(queue_init(size, item), self.device)
        self.queue = _push(self.queue, item)

    def write_back(self, qmodel):
        """Copies the trained parts (host round trip) into ``qmodel``'s matching submodules."""
        trained = nnx.merge(self.graphdef, jax.device_get(self.state.params), jax.device_get(self.state.rest)).q
        for dst, src in zip(_parts(qmodel, self.mod), _parts(trained, self.local)):
            nnx.update(dst, jax.tree.map(jnp.asarray, nnx.state(src)))


def mrem_p(qmodel, teacher, calib: Mapping[str, np.ndarray], *, num_modules: int = 4, steps: int = 2000,
           learning_rate: float = 1e-4, batch_size: int = 32, queue_size: int = 8, teacher_forcing: float = 0.4,
           placement: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None,
           eval_batch_size: int = 64, seed: int = 0, log: Callable[[str], Any] | None = print) -> ptq.Reconstruction:
    """MREM-P (see module docstring) of a `quantize_model` copy ``qmodel`` of ``teacher``.

    Returns a `ptq.Reconstruction` ``(model, report, info)``: the new qmodel, ``report`` one
    dict per module like `mrem.mrem_s`'s plus ``device``; ``info``: ``devices`` (one per
    module), ``shared_devices``, ``queue_size``, ``anneal_steps`` (T0), ``batch_size``,
    ``seconds_fill`` / ``seconds_parallel`` (wall time of the sequential fill and of the
    parallel phase), ``seconds_train``, ``seconds`` (the whole call).  ``qmodel`` itself is not
    modified.  ``teacher_forcing``: T0 as a fraction of ``steps`` (0 = none).  ``devices``: the
    devices to place modules on (default ``jax.local_devices()``); ``placement`` indexes them.
    """
    start = time.perf_counter()
    mods = mrem.modules(F.num_layers(qmodel), num_modules)
    steps, queue_size = int(steps), int(queue_size)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if queue_size < 1:
        raise ValueError(f"queue_size (t0) must be >= 1, got {queue_size}")
    if not 0.0 <= float(teacher_forcing) <= 1.0:
        raise ValueError(f"teacher_forcing is T0 as a fraction of the steps, in [0, 1]; got {teacher_forcing}")
    arrays = ptq.token_arrays(calib)
    rows = len(arrays["input_ids"])
    if rows == 0:
        raise ValueError("the calibration set is empty")
    devices, shared = place(len(mods), placement, devices)
    ids = [d.id for d in devices]
    if log:
        log(f"MREM-P: {len(mods)} modules on devices {ids}" + (
            f" -- fewer devices ({len(set(ids))}) than modules: modules share devices and run their steps "
            "one after another there" if shared else " (one module per device)"))
    b = min(int(batch_size), rows)
    anneal_steps = float(teacher_forcing) * steps
    before = mrem.module_losses(qmodel, teacher, mods, arrays, eval_batch_size)

    from efficient_nlp import data as data_lib
    optimizer = ptq.adam_linear_decay(float(learning_rate), max(steps, 1))
    workers = [_Worker(qmodel, teacher, mod, dev, seed, optimizer) for mod, dev in zip(mods, devices)]
    batches = data_lib.train_batches(arrays, b, seed=seed)
    lam = np.asarray(forcing_lambda(np.arange(steps), anneal_steps), np.float32)
    t0 = time.perf_counter()
    fill_end = t0
    for t in range(steps):
        parallel = t >= queue_size
        if t == queue_size:
            jax.block_until_ready([w.losses[-1] for w in workers])
            fill_end = time.perf_counter()
        pending = []
        for n, w in enumerate(workers):
            feed = jax.device_put(next(batches), w.device) if n == 0 else w.queue
            out = w.step(feed, t, lam[t])
            if out is None:
                continue
            if parallel:
                pending.append((workers[n + 1], out))
            else:
                workers[n + 1].push(out, queue_size)
        for consumer, out in pending:
            consumer.push(out, queue_size)
        if t >= 2:  # bound the asynchronous dispatch: each module at most two steps ahead of the host
            jax.block_until_ready([w.losses[t - 2] for w in workers])
    jax.block_until_ready([w.losses[-1:] for w in workers])
    end = time.perf_counter()
    train_seconds = end - t0
    if steps <= queue_size:
        fill_end = end

    out = train.copy_model(qmodel)
    for w in workers:
        w.write_back(out)
    after = mrem.module_losses(out, teacher, mods, arrays, eval_batch_size)
    report = []
    for w, lb, la in zip(workers, before, after):
        losses = [float(x) for x in jax.device_get(w.losses)]
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError(f"MREM-P module {w.mod.index} diverged (non-finite loss); lower the learning rate")
        report.append(dict(index=w.mod.index, layers=[w.mod.start, w.mod.stop], device=w.device.id,
                           trainable=w.count, loss_before=lb, loss_after=la,
                           first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None))
        if log:
            log(f"MREM-P module {w.mod.index} (layers {w.mod.start}..{w.mod.stop - 1}, device {w.device.id}): "
                f"loss {lb:.4g} -> {la:.4g}")
    info = dict(devices=ids, shared_devices=shared, queue_size=queue_size, anneal_steps=anneal_steps, batch_size=b,
                seconds_fill=fill_end - t0, seconds_parallel=end - fill_end, seconds_train=train_seconds,
                seconds=time.perf_counter() - start)
    if log:
        log(f"MREM-P: {steps} steps in {train_seconds:.1f}s (fill {info['seconds_fill']:.1f}s, "
            f"parallel {info['seconds_parallel']:.1f}s)")
    return ptq.Reconstruction(out, report, info)


__all__ = ["mrem_p", "forcing_lambda", "teacher_force", "queue_init", "queue_push", "queue_sample", "place",
           "module_slice"]
