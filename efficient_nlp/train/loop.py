"""The one training loop used by every recipe: ``fit``.

Functional NNX: the model is split into ``graphdef``, trainable state (``nnx.Param`` by
default) and the rest; the library's one update (`efficient_nlp.train.step.make_step`) is
jitted with the state replicated over the mesh, the batch sharded over ``data`` and the
state buffers donated.

Step numbering: ``step`` counts completed updates. Update ``t`` (1 ... num_steps) uses
the ``t``-th batch of ``batches(0)`` (batch index ``t - 1``), the learning rate
``schedule(t - 1)`` and the dropout key ``fold_in(key(seed), t)``. A checkpoint labelled
``t`` holds the state after update ``t``; resuming from it calls ``batches(t)``, so a
resumed run repeats exactly what an uninterrupted one would have done.
"""
import dataclasses
import functools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from efficient_nlp.train import distributed
from efficient_nlp.train.checkpoint import Checkpointer
from efficient_nlp.train.metrics import MetricsWriter
from efficient_nlp.train.optim import make_lr_schedule, make_optimizer
from efficient_nlp.train.step import NonFiniteLossError, init_state, make_step, mean_metrics, step_key

log = logging.getLogger(__name__)


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
        checkpoint_checksums=True,  # CRC32 per leaf, verified on restore.
        tensorboard=True,
        progress_bar=True,         # tqdm on process 0 when stderr is a terminal.
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
    progress_bar: bool

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
    """Splits the model, replicates its state, builds the optimizer and the step."""

    def __init__(self, model, loss_fn, opts, *, mesh=None, optimizer=None, lr_schedule=None,
                 trainable=nnx.Param):
        self.opts = opts
        self.mesh = mesh or distributed.make_mesh()
        rep = distributed.replicated(self.mesh)
        if optimizer is None:
            self.tx = make_optimizer(opts, opts.num_steps)
            self.schedule = make_lr_schedule(opts, opts.num_steps)
        else:
            self.tx, self.schedule = optimizer, lr_schedule
        self.graphdef, state = init_state(model, self.tx, trainable)
        # New buffers (never aliases of the caller's model, which donation would delete).
        self.state = distributed.replicate(state, self.mesh)
        self.nonfinite = distributed.replicate(np.full((), -1, np.int32), self.mesh)
        # Jitted per run (not cached across runs: loss_fn may hold a teacher's arrays).
        self.step_fn = jax.jit(
            functools.partial(_fit_step, loss_fn, self.tx, trainable, int(opts.seed), self.graphdef),
            donate_argnums=(0, 1), out_shardings=(rep, rep, rep))

    def run(self, host_batch):
        batch = distributed.shard_batch(host_batch, self.mesh)
        self.state, self.nonfinite, metrics = self.step_fn(self.state, self.nonfinite, batch)
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
        return distributed.scalars_to_host(metrics)["loss"]

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
# fit
# ---------------------------------------------------------------------------------------
def fit(model, loss_fn, batches, *, config, workdir, eval_fn=None, optimizer=None,
        lr_schedule=None, trainable=nnx.Param, mesh=None):
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
      mesh: a mesh with a ``data`` axis (default: all devices).

    Returns:
      The trained model (a new module) and ``history``: the list of logged dicts, each
      ``{"step": t, ...}``; training records hold the mean over the steps since the
      previous record of ``loss``, ``grad_norm`` and the aux values, plus ``lr`` (of
      step t) and ``steps_per_sec``; evaluation records hold ``eval/<name>``.

    Raises:
      NonFiniteLossError: the loss or gradient norm was NaN/inf; names the first such
        step. Nothing after it was saved, so the latest checkpoint is the last good one.
      CorruptCheckpointError / IncompatibleCheckpointError: resuming failed.
    """
    opts = train_options(config)
    setup = _Setup(model, loss_fn, opts, mesh=mesh, optimizer=optimizer,
                   lr_schedule=lr_schedule, trainable=trainable)
    num_steps = opts.num_steps
    main = distributed.is_main_process()
    history = []
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        max_to_keep=opts.keep_checkpoints or None,
                        async_save=opts.async_checkpointing,
                        checksums=opts.checkpoint_checksums)
    writer = None
    pbar = None
    try:
        start = 0
        latest = ckpt.latest_step()
        if latest is not None:
            if not opts.resume:
                raise ValueError(
                    f"{ckpt.directory} already holds checkpoints (latest step {latest}) but "
                    "config.train.resume is False; use a new workdir or delete them.")
            start, setup.state = _restore(ckpt, latest, setup.state)
            log.info("Resumed from %s at step %d", ckpt.step_dir(start), start)
            if start > num_steps:
                log.warning("The latest checkpoint (step %d) is past num_steps=%d; "
                            "returning it untrained.", start, num_steps)
        if main:
            _truncate_metrics(workdir, start)
        writer = MetricsWriter(workdir, tensorboard=opts.tensorboard)
        pbar = _progress_bar(opts, start, num_steps, main)

        window = []  # (step, device metrics) since the last training record
        timer = time.perf_counter()
        timed_steps = 0
        iterator = iter(batches(start)) if start < num_steps else iter(())
        for t in range(start + 1, num_steps + 1):
            try:
                host_batch = next(iterator)
            except StopIteration:
                raise ValueError(f"batches({start}) ran out before step {t}") from None
            window.append((t, setup.run(host_batch)))
            timed_steps += 1
            if pbar is not None:
                pbar.update(1)

            last = t == num_steps
            do_log = last or (opts.log_every > 0 and t % opts.log_every == 0)
            do_ckpt = last or (opts.checkpoint_every > 0 and t % opts.checkpoint_every == 0)
            do_eval = eval_fn is not None and (
                last or (opts.eval_every > 0 and t % opts.eval_every == 0))
            if not (do_log or do_ckpt or do_eval):
                continue
            _check_finite(setup, window, ckpt)
            if do_log:
                elapsed = time.perf_counter() - timer
                record = _train_record(setup, window, t, timed_steps / max(elapsed, 1e-9))
                history.append(writer.write(t, record))
                _report(pbar, record, t, num_steps)
                window = []
            if do_ckpt:
                ckpt.save(t, setup.state)
            if do_eval:
                results = eval_fn(setup.model())
                record = {f"eval/{k}": v for k, v in results.items()}
                history.append(writer.write(t, record))
                _report(pbar, record, t, num_steps)
            if do_log or do_eval:
                timer, timed_steps = time.perf_counter(), 0
        if start >= num_steps and eval_fn is not None:  # already complete: final eval only
            results = eval_fn(setup.model())
            history.append(writer.write(start, {f"eval/{k}": v for k, v in results.items()}))
    finally:
        if pbar is not None:
            pbar.close()
        try:
            ckpt.close()  # waits for asynchronous saves
        finally:
            if writer is not None:
                writer.close()
    return setup.model(), history


def _restore(ckpt, step, state):
    restored = ckpt.restore(step, state)
    saved_step = int(distributed.to_host(restored.step))
    if saved_step != int(step):
        from efficient_nlp.train.checkpoint import CorruptCheckpointError
        raise CorruptCheckpointError(
            ckpt.step_dir(step), f"it holds the state of step {saved_step}")
    return saved_step, restored


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
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    import json
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)


def _progress_bar(opts, start, num_steps, main):
    """tqdm on process 0 in a terminal or a notebook; None elsewhere (CI logs)."""
    if not (main and opts.progress_bar and _interactive()):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True)


def _interactive():
    if "ipykernel" in sys.modules:  # Jupyter / Colab
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _report(pbar, record, t, num_steps):
    if pbar is not None:
        keys = [k for k in ("loss", "lr") if k in record] or list(record)[:3]
        pbar.set_postfix({k: f"{record[k]:.4g}" for k in keys}, refresh=False)
    elif distributed.is_main_process():
        text = " ".join(f"{k}={v:.4g}" for k, v in record.items())
        log.info("step %d/%d %s", t, num_steps, text)
