"""The one training loop used by every recipe: ``fit``.

Functional NNX: the model is split into ``graphdef``, trainable state (``nnx.Param`` by
default) and the rest; the library's one update (`efficient_nlp.train.step.make_step`) is
jitted with the state placed on the (``data``, ``model``) mesh by the rules of
``config.train.sharding`` (`efficient_nlp.train.sharding`; replicated by default), the batch
sharded over ``data`` and the state buffers donated.

Checkpoints hold what a resumed run cannot rebuild: the step, the trained variables, the
optimizer state and the non-trainable variables other than ``nnx.Param`` (counters, RNG
streams, statistics). The ``nnx.Param`` variables outside ``trainable`` (a distillation
teacher, a frozen backbone) are constants of the run: they are not written, and a resumed run
takes them from the model it is given.

Step numbering: ``step`` counts completed updates. Update ``t`` (1 ... num_steps) uses
the ``t``-th batch of ``batches(0)`` (batch index ``t - 1``), the learning rate
``schedule(t - 1)`` and the dropout key ``fold_in(key(seed), t)``. A checkpoint labelled
``t`` holds the state after update ``t``; resuming from it calls ``batches(t)``, so a
resumed run repeats exactly what an uninterrupted one would have done.

Faults: SIGINT / SIGTERM make ``fit`` finish the update in flight, save it and raise
``TrainingInterrupted``; on resume a corrupt newest checkpoint is moved aside and the
previous one used. Console progress: `efficient_nlp.train.progress`; compute accounting of the
executed steps (FLOPs, throughput, energy): `efficient_nlp.train.step_cost` reports each step to the
meters of `efficient_nlp.train.compute`.
"""
import contextlib
import dataclasses
import functools
import logging
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from efficient_nlp.train import distributed, sharding, step_cost
from efficient_nlp.train.checkpoint import Checkpointer, CorruptCheckpointError
from efficient_nlp.train.metrics import MetricsWriter
from efficient_nlp.train.optim import make_lr_schedule, make_optimizer
from efficient_nlp.train.precision import compute_dtype, set_compute_dtype
from efficient_nlp.train.progress import ProgressReporter
from efficient_nlp.train.step import NonFiniteLossError, init_state, make_step, mean_metrics, step_key

log = logging.getLogger(__name__)

# Updates dispatched ahead of the one last finished.  JAX dispatches asynchronously: without a
# bound the host queues dozens of updates, so progress lines come in bursts and an interrupt
# waits for the whole queue.  A few keep the device busy while the host prepares the next batches.
MAX_IN_FLIGHT = 4


def default_train_config():
    """``config.train`` defaults; recipe configs start from this and override fields."""
    return ml_collections.ConfigDict(dict(
        num_steps=1000,
        batch_size=32,             # GLOBAL batch size (each host feeds 1/process_count).
        eval_batch_size=128,
        learning_rate=5e-5,
        warmup_ratio=0.1,          # of num_steps; linear warmup then linear decay to 0.
        weight_decay=0.01,         # AdamW, not on biases / LayerNorm / ndim <= 1 leaves.
        grad_clip=1.0,             # global norm; 0 disables.
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        seed=0,                    # dropout keys (and, by convention, data order).
        log_every=50,              # also logs the last step.
        eval_every=0,              # 0: evaluate only at the end.
        checkpoint_every=500,      # 0: checkpoint only at the end.
        keep_checkpoints=2,        # newest N kept (0 or None: all).
        resume=True,               # continue from the latest checkpoint in workdir.
        async_checkpointing=True,
        checkpoint_checksums=True,  # a checksum per leaf (computed on device), verified on restore.
        tensorboard=True,
        mesh=ml_collections.ConfigDict(dict(data=-1, model=1)),  # -1: the remaining devices.
        # "replicated" (data parallel), "fsdp", "tensor", "fsdp+tensor" or [(regex, spec), ...]
        # (efficient_nlp.train.sharding).
        sharding=ml_collections.FieldReference("replicated", field_type=object),
        compute_dtype="float32",   # or "bfloat16" (parameters stay float32).
        progress_bar=True,         # tqdm on process 0 when stderr is a terminal.
        progress_seconds=30.0,     # without a terminal: a progress line at least this often
                                   # (seconds of wall time; 0: only the log_every records).
    ))


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """The resolved ``config.train`` (defaults filled in)."""
    num_steps: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    seed: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    async_checkpointing: bool
    checkpoint_checksums: bool
    tensorboard: bool
    mesh: dict
    sharding: object
    compute_dtype: str
    progress_bar: bool
    progress_seconds: float

    def get(self, key, default=None):
        return getattr(self, key, default)


def train_options(config):
    """Resolves ``config.train`` (or a bare train section / dict) against the defaults."""
    try:
        section = config.train
    except (AttributeError, KeyError):
        section = config
    defaults = default_train_config()
    values = {}
    for field in dataclasses.fields(TrainOptions):
        value = None
        if section is not None:
            try:
                value = section.get(field.name) if hasattr(section, "get") else getattr(
                    section, field.name, None)
            except (AttributeError, KeyError):
                value = None
        if value is None:
            value = defaults[field.name]
        if field.type in ("int", int) and value is not None:
            value = int(value)
        values[field.name] = value
    values["mesh"] = dict(values["mesh"])
    if not isinstance(values["sharding"], str):  # a list of rules (checked by `sharding.rules_of`)
        values["sharding"] = tuple(values["sharding"])
    return TrainOptions(**values)


# ---------------------------------------------------------------------------------------
# The step of fit: `make_step` plus the step's dropout key and the first non-finite step.
# ---------------------------------------------------------------------------------------
def _fit_step(loss_fn, tx, trainable, seed, graphdef, state, nonfinite_step, batch):
    """One update; ``nonfinite_step`` is -1 until the first step whose loss or gradient norm
    is not finite, then that step (kept on device; the host checks it at log/eval/save time)."""
    t = state.step + 1
    state, metrics = make_step(loss_fn, tx, trainable)(graphdef, state, batch, step_key(seed, t))
    metrics = mean_metrics(metrics)
    bad = metrics.pop("nonfinite")
    nonfinite_step = jnp.where((nonfinite_step < 0) & bad, t, nonfinite_step).astype(jnp.int32)
    return state, nonfinite_step, metrics


class _Setup:
    """Splits the model, places its state by the sharding rules, builds the optimizer and the
    step."""

    def __init__(self, model, loss_fn, opts, *, mesh=None, optimizer=None, lr_schedule=None,
                 trainable=nnx.Param, opt_state=None):
        self.opts = opts
        self.mesh = mesh or sharding.make_mesh(opts.mesh)
        rep = distributed.replicated(self.mesh)
        if optimizer is None:
            self.tx = make_optimizer(opts, opts.num_steps)
            self.schedule = make_lr_schedule(opts, opts.num_steps)
        else:
            self.tx, self.schedule = optimizer, lr_schedule
        if compute_dtype(opts.compute_dtype) != jnp.float32:
            # A copy: the caller's model keeps its compute dtype (float32 leaves the model as given).
            model = set_compute_dtype(nnx.clone(model), opts.compute_dtype)
        self.graphdef, state = init_state(model, self.tx, trainable, opt_state)
        self.shardings = sharding.shardings(state, self.mesh, opts.sharding)
        # New buffers (never aliases of the caller's model, which donation would delete).
        self.state = distributed.put(state, self.shardings)
        self.nonfinite = distributed.replicate(np.full((), -1, np.int32), self.mesh)
        # Jitted per run (not cached across runs: loss_fn may hold a teacher's arrays). The
        # state and batch arrive placed (`distributed.put`, `shard_batch`): the step compiles
        # for their shardings and returns the state with the same ones.
        self.step_fn = jax.jit(
            functools.partial(_fit_step, loss_fn, self.tx, trainable, int(opts.seed), self.graphdef),
            donate_argnums=(0, 1), out_shardings=(self.shardings, rep, rep))
        # Reports each step to the compute meters of `efficient_nlp.train.compute`, if any.
        self.metered = step_cost.metered(self.step_fn, batch_argnum=2, model=model, devices=self.mesh.size)

    def run(self, host_batch):
        batch = distributed.shard_batch(host_batch, self.mesh)
        self.state, self.nonfinite, metrics = self.metered(self.state, self.nonfinite, batch)
        return metrics

    def model(self):
        return nnx.merge(self.graphdef, self.state.params, self.state.rest)

    def lr_at(self, step):
        """Learning rate update ``step`` used (None without a known schedule)."""
        if self.schedule is None:
            return None
        return float(self.schedule(step - 1))


class StepRunner:
    """``runner(host_batch) -> loss``: one blocking training step (for benchmarks).

    Same step function, sharding and optimizer as ``fit``, without checkpoints/metrics.
    """

    def __init__(self, model, loss_fn, *, config, mesh=None, optimizer=None,
                 lr_schedule=None, trainable=nnx.Param):
        self._setup = _Setup(model, loss_fn, train_options(config), mesh=mesh,
                             optimizer=optimizer, lr_schedule=lr_schedule,
                             trainable=trainable)

    def __call__(self, host_batch):
        metrics = self._setup.run(host_batch)
        loss = distributed.scalars_to_host(metrics)["loss"]
        self._setup.metered.synced()
        return loss

    @property
    def model(self):
        return self._setup.model()

    @property
    def state(self):
        return self._setup.state


def make_step_runner(model, loss_fn, *, config, **kwargs):
    """See ``StepRunner``."""
    return StepRunner(model, loss_fn, config=config, **kwargs)


# ---------------------------------------------------------------------------------------
# SIGINT / SIGTERM
# ---------------------------------------------------------------------------------------
class TrainingInterrupted(KeyboardInterrupt):
    """``fit`` stopped on SIGINT / SIGTERM after saving update ``step`` to ``checkpoint``
    (a step directory); running it again with the same workdir resumes from there."""

    def __init__(self, step, checkpoint):
        self.step = int(step)
        self.checkpoint = str(checkpoint)
        super().__init__(f"Interrupted at step {self.step}; saved {self.checkpoint}. Run the "
                         "same command again (same workdir) to resume.")


class _StopSignals:
    """SIGINT / SIGTERM handlers for the duration of ``fit``.

    The first signal only sets ``signum`` (fit stops after the update in flight and saves
    it). A second one stops at once with ``KeyboardInterrupt`` (nothing more is saved),
    except inside ``shielded()`` (a checkpoint being written or moved), where it is
    ignored. Installed only in the main thread of a single-process run (processes of a
    multi-host run would stop at different steps) and not for signals set to be ignored;
    ``uninstall`` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._shielded = 0
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name

    def install(self):
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:  # ignored, or not from Python
                continue
            signal.signal(signum, self._handle)
            self._previous[signum] = previous

    def uninstall(self):
        while self._previous:
            signum, previous = self._previous.popitem()
            signal.signal(signum, previous)

    @contextlib.contextmanager
    def shielded(self):
        """Context in which a second signal is ignored."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s received: finishing the current step, then saving a checkpoint "
                        "(send it again to stop at once without saving).", name)
        elif self._shielded:
            log.warning("%s received while a checkpoint is being written; ignored (the "
                        "checkpoint is completed first).", name)
        else:
            raise KeyboardInterrupt(f"{name} received twice; stopped without saving")


# ---------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------
def fit(model, loss_fn, batches, *, config, workdir, eval_fn=None, optimizer=None,
        lr_schedule=None, trainable=nnx.Param, mesh=None, opt_state=None):
    """Trains ``model`` for ``config.train.num_steps`` updates; returns ``(model, history)``.

    Args:
      model: an NNX module (left untouched; the trained copy is returned).
      loss_fn: ``loss_fn(model, batch, rngs) -> (loss, aux)``, traced inside jit on the
        merged model; ``batch`` holds global (sharded) arrays, ``rngs`` is
        ``nnx.Rngs(dropout=fold_in(key(seed), step))``; ``aux`` a dict of scalars.
      batches: ``batches(start_step) -> iterator`` of host-local numpy batches (pytrees
        with a leading batch axis of ``batch_size // process_count`` rows); it must
        yield the batches of updates ``start_step + 1, start_step + 2, ...``.
      config: a config with a ``train`` section (see ``default_train_config``).
      workdir: holds ``checkpoints/``, ``metrics.jsonl`` and TensorBoard events.
      eval_fn: ``eval_fn(model) -> dict[str, float]``, called on every process every
        ``eval_every`` steps and at the end; logged with the prefix ``eval/``.
      optimizer: an optax transformation replacing ``make_optimizer(config, num_steps)``
        (``lr_schedule(count)`` then gives the logged learning rate).
      trainable: NNX filter of the variables that get gradients (default ``nnx.Param``);
        all other variables pass through the step (updated if the model mutates them).
      mesh: a mesh with a ``data`` axis (default: `efficient_nlp.train.sharding.make_mesh` of
        ``config.train.mesh``); the state is placed on it by ``config.train.sharding``.
      opt_state: the optimizer state to start from instead of ``optimizer.init(params)`` (e.g.
        Adam moments carried over from a smaller model by progressive stacking); it must match
        the structure, shapes and dtypes of that init state (else ``ValueError`` naming the
        difference).  Ignored, with a log line, when resuming from a checkpoint.

    Returns:
      The trained model (a new module) and ``history``: the list of logged dicts, each
      ``{"step": t, ...}``; training records hold the mean over the steps since the
      previous record of ``loss``, ``grad_norm`` and the aux values, plus ``lr`` (of
      step t) and ``steps_per_sec``; evaluation records hold ``eval/<name>``.

    Progress: a tqdm bar in a terminal, else log lines after the first update and at least
    every ``progress_seconds`` (see `efficient_nlp.train.progress`).

    Interrupts (main thread of a single-process run): on SIGINT / SIGTERM, fit finishes
    the update in flight (and its log record and checkpoint if due, not its evaluation),
    checks it is finite, saves it and raises ``TrainingInterrupted``; calling fit again
    with the same workdir resumes exactly. A second signal stops at once without saving,
    unless a checkpoint is being written (then it is ignored).

    Resuming: when the newest checkpoint is corrupt, a warning names it and the reason, it
    is moved to ``<workdir>/checkpoints_corrupt/`` (kept, never deleted) and the previous
    one is tried, and so on.

    Raises:
      NonFiniteLossError: the loss or gradient norm was NaN/inf; names the first such
        step. Nothing after it was saved, so the latest checkpoint is the last good one.
      TrainingInterrupted: SIGINT / SIGTERM; names the step and the checkpoint saved.
      CorruptCheckpointError: no checkpoint in the workdir restores intact (all were moved
        aside). IncompatibleCheckpointError: the newest checkpoint is of another model or
        optimizer (raised at once; nothing is moved).
    """
    opts = train_options(config)
    setup = _Setup(model, loss_fn, opts, mesh=mesh, optimizer=optimizer,
                   lr_schedule=lr_schedule, trainable=trainable, opt_state=opt_state)
    num_steps = opts.num_steps
    main = distributed.is_main_process()
    history = []
    ckpt = Checkpointer(epath.Path(workdir) / "checkpoints",
                        max_to_keep=opts.keep_checkpoints or None,
                        async_save=opts.async_checkpointing,
                        checksums=opts.checkpoint_checksums)
    stop = _StopSignals()
    writer = None
    progress = None
    try:
        stop.install()
        start = 0
        latest = ckpt.latest_step()
        if latest is not None:
            if not opts.resume:
                raise ValueError(
                    f"{ckpt.directory} already holds checkpoints (latest step {latest}) but "
                    "config.train.resume is False; use a new workdir or delete them.")
            start, setup.state = _resume(ckpt, setup.state, stop)
            if opt_state is not None:
                log.info("opt_state ignored: resumed from the checkpoint of step %d, which holds "
                         "its own optimizer state", start)
            if start > num_steps:
                log.warning("The latest checkpoint (step %d) is past num_steps=%d; "
                            "returning it untrained.", start, num_steps)
        if main:
            _truncate_metrics(workdir, start)
        writer = MetricsWriter(workdir, tensorboard=opts.tensorboard)
        progress = ProgressReporter(opts, start, num_steps, setup.lr_at, main=main)

        window = []  # (step, device metrics) since the last training record
        in_flight = []  # metrics of the updates dispatched but maybe not finished
        timer = time.perf_counter()
        timed_steps = 0
        iterator = iter(batches(start)) if start < num_steps else iter(())
        for t in range(start + 1, num_steps + 1):
            try:
                host_batch = next(iterator)
            except StopIteration:
                raise ValueError(f"batches({start}) ran out before step {t}") from None
            metrics = setup.run(host_batch)
            window.append((t, metrics))
            in_flight.append(metrics)
            if len(in_flight) > MAX_IN_FLIGHT:  # finished or about to be: keeps the device busy
                jax.block_until_ready(in_flight.pop(0))
            timed_steps += 1
            progress.after_update(t, metrics)

            last = t == num_steps
            do_log = last or (opts.log_every > 0 and t % opts.log_every == 0)
            do_ckpt = last or (opts.checkpoint_every > 0 and t % opts.checkpoint_every == 0)
            do_eval = eval_fn is not None and (
                last or (opts.eval_every > 0 and t % opts.eval_every == 0))
            if not (do_log or do_ckpt or do_eval or stop.requested):
                continue
            _check_finite(setup, window, ckpt)  # waits for the device
            setup.metered.synced()
            if do_log:
                elapsed = time.perf_counter() - timer
                record = _train_record(setup, window, t, timed_steps / max(elapsed, 1e-9))
                history.append(writer.write(t, record))
                progress.record(t, record)
                window = []
            if do_ckpt:
                with stop.shielded():
                    ckpt.save(t, _checkpointed(setup.state)[0])
            if stop.requested:
                raise _interrupted(ckpt, setup.state, t, stop)
            if do_eval:
                results = eval_fn(setup.model())
                record = {f"eval/{k}": v for k, v in results.items()}
                history.append(writer.write(t, record))
                progress.record(t, record)
            if do_log or do_eval:
                timer, timed_steps = time.perf_counter(), 0
        if start >= num_steps and eval_fn is not None:  # already complete: final eval only
            results = eval_fn(setup.model())
            history.append(writer.write(start, {f"eval/{k}": v for k, v in results.items()}))
    finally:
        try:
            if progress is not None:
                progress.close()
            with stop.shielded():
                ckpt.close()  # waits for asynchronous saves
        finally:
            if writer is not None:
                writer.close()
            stop.uninstall()
    return setup.model(), history


def _interrupted(ckpt, state, t, stop):
    """Saves step ``t`` (unless saved already) and waits for it; returns the exception
    fit raises after a signal."""
    with stop.shielded():
        ckpt.save(t, _checkpointed(state)[0])
        ckpt.wait_until_finished()
    step_dir = ckpt.step_dir(t)
    log.warning("Stopped by %s after step %d; saved %s", stop.name, t, step_dir)
    return TrainingInterrupted(t, step_dir)


def _resume(ckpt, state, stop):
    """``(step, state)`` of the newest checkpoint that restores intact.

    A corrupt one (``CorruptCheckpointError``) is moved aside with a warning and the one
    before it tried; ``IncompatibleCheckpointError`` propagates at once.
    """
    set_aside = []
    step = ckpt.latest_step()
    while step is not None:
        try:
            start, restored = _restore(ckpt, step, state)
        except CorruptCheckpointError as e:
            with stop.shielded():
                moved = ckpt.set_aside(step)
            log.warning("Checkpoint %s is corrupt (%s); moved it to %s and falling back to "
                        "the previous checkpoint.", e.step_dir, e.reason, moved)
            set_aside.append(f"{moved} ({e.reason})")
            step = ckpt.latest_step()
            continue
        log.info("Resumed from %s at step %d", ckpt.step_dir(start), start)
        return start, restored
    raise CorruptCheckpointError(
        ckpt.directory, "no checkpoint in it is intact; moved aside (kept): "
        + "; ".join(set_aside) + ". To start over, train in a new workdir.")


def _checkpointed(state):
    """``(saved, constants)``: the part of ``state`` a checkpoint holds (module docstring) and
    the non-trainable ``nnx.Param`` variables it leaves out."""
    constants, rest = nnx.split_state(state.rest, nnx.Param, ...)
    return state._replace(rest=rest), constants


def _restore(ckpt, step, state):
    """Restores ``step`` into the placement of ``state``, whose constants it keeps."""
    target, constants = _checkpointed(state)
    restored = ckpt.restore(step, target)
    saved_step = int(distributed.to_host(restored.step))
    if saved_step != int(step):
        raise CorruptCheckpointError(
            ckpt.step_dir(step), f"it holds the state of step {saved_step}")
    return saved_step, restored._replace(rest=nnx.merge_state(constants, restored.rest))


def _check_finite(setup, window, ckpt):
    bad = int(distributed.to_host(setup.nonfinite))
    if bad < 0:
        return
    values = dict((t, m) for t, m in window).get(bad)
    detail = ""
    if values is not None:
        v = distributed.scalars_to_host(values)
        detail = f" (loss={v['loss']}, grad_norm={v['grad_norm']})"
    ckpt.wait_until_finished()
    latest = ckpt.latest_step()
    where = ckpt.step_dir(latest) if latest is not None else "none"
    raise NonFiniteLossError(
        bad, f"Non-finite loss or gradient at step {bad}{detail}; training stopped and "
        f"nothing after step {bad - 1} was saved (latest checkpoint: {where}).")


def _train_record(setup, window, t, steps_per_sec):
    host = distributed.scalars_to_host([m for _, m in window])
    record = {}
    for name in host[0]:
        record[name] = float(np.mean([h[name] for h in host]))
    lr = setup.lr_at(t)
    if lr is not None:
        record["lr"] = lr
    record["steps_per_sec"] = float(steps_per_sec)
    return record


def _truncate_metrics(workdir, start):
    """Drops records after ``start`` left by an interrupted run (they are redone)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    import json
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        path.write_text("".join(keep), encoding="utf-8")
