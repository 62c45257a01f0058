"""Console progress of ``fit``: a tqdm bar in a terminal or notebook, timed log lines elsewhere.

Without a terminal (CI logs, ``nohup``, output piped to a file) the logger of this module
writes, on process 0 only:

* one line after the first update of the run, with how long it took (it includes the
  compilation of the step), e.g. ``step 1/300 loss=0.6931 lr=0 first step took 14.2s
  (includes compilation)``;
* then one line at least every ``train.progress_seconds`` of wall time, e.g.
  ``step 40/300 loss=0.512 lr=9.3e-05 1.9 steps/s eta 2m20s``, besides the records of
  every ``train.log_every`` steps (which reset that clock).

In a terminal the bar's postfix shows the loss and learning rate of the latest update
at most every ``POSTFIX_SECONDS``.

Timed lines and the postfix show the values of the update *before* the one just
dispatched: it has finished (or is about to), so reading its metrics does not stall the
device, and they are read at most once per interval, never every step.
"""
import logging
import sys
import time

from efficient_nlp.train import distributed

log = logging.getLogger(__name__)

POSTFIX_SECONDS = 1.0  # the tqdm postfix is refreshed at most this often


def interactive():
    """True in a Jupyter/Colab kernel or when stderr is a terminal."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def make_bar(start, num_steps):
    """The tqdm bar of a run (a function of its own so tests can replace it)."""
    from tqdm.auto import tqdm
    return tqdm(total=num_steps, initial=start, desc="train", dynamic_ncols=True)


def format_duration(seconds):
    """``3.2s``, ``45s``, ``2m20s``, ``1h05m``."""
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _values_text(values):
    parts = [f"loss={values['loss']:.4g}"] if "loss" in values else []
    if values.get("lr") is not None:
        parts.append(f"lr={values['lr']:.3g}")
    return " ".join(parts)


class ProgressReporter:
    """What ``fit`` shows while it runs (see the module docstring).

    Args:
      opts: the run's ``TrainOptions`` (``progress_bar``, ``progress_seconds``).
      start: the step the run starts from (0, or the resumed checkpoint's step).
      num_steps: the last step.
      lr_at: ``lr_at(step) -> float | None``, the learning rate of update ``step``.
      main: whether this is process 0 (other processes show nothing).
    """

    def __init__(self, opts, start, num_steps, lr_at, *, main):
        self.start, self.num_steps, self.lr_at = start, num_steps, lr_at
        self.enabled = bool(main)
        self.bar = make_bar(start, num_steps) if (
            self.enabled and opts.progress_bar and interactive()) else None
        # Seconds between timed updates; None: none (progress_seconds 0 without a bar).
        self.interval = POSTFIX_SECONDS if self.bar is not None else (
            float(opts.progress_seconds) if opts.progress_seconds else None)
        self._began = time.perf_counter()
        self._mark_time, self._mark_step = self._began, start
        self._previous = None  # (step, device metrics) of the update before the latest

    def after_update(self, t, metrics):
        """Called right after update ``t`` was dispatched; ``metrics`` are its (device) values."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if t == self.start + 1:
            self._first(t, metrics)
        elif self.interval is not None and self._previous is not None and \
                self._previous[0] > self._mark_step and \
                time.perf_counter() - self._mark_time >= self.interval:
            self._timed(*self._previous)
        self._previous = (t, metrics)

    def record(self, t, record):
        """Shows a ``log_every`` / evaluation record of step ``t`` (host floats)."""
        if not self.enabled:
            return
        if self.bar is not None:
            keys = [k for k in ("loss", "lr") if k in record] or list(record)[:3]
            self.bar.set_postfix({k: f"{record[k]:.4g}" for k in keys}, refresh=False)
        else:
            text = " ".join(f"{k}={v:.4g}" for k, v in record.items())
            log.info("step %d/%d %s", t, self.num_steps, text)
        if "loss" in record:  # a training record: its step has finished
            self._mark(t)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    # -- internals -----------------------------------------------------------------------
    def _host_values(self, step, metrics):
        values = {"loss": distributed.scalars_to_host(metrics["loss"])}
        values["lr"] = self.lr_at(step)
        return values

    def _mark(self, step):
        self._mark_time, self._mark_step = time.perf_counter(), step

    def _first(self, t, metrics):
        values = self._host_values(t, metrics)  # waits for the first update: one sync per run
        took = time.perf_counter() - self._began
        self._mark(t)
        if self.bar is not None:
            self._postfix(values)
        else:
            log.info("step %d/%d %s first step took %s (includes compilation)", t,
                     self.num_steps, _values_text(values), format_duration(took))

    def _timed(self, step, metrics):
        values = self._host_values(step, metrics)
        now = time.perf_counter()
        if self.bar is not None:
            self._postfix(values)
        else:
            rate = (step - self._mark_step) / max(now - self._mark_time, 1e-9)
            log.info("step %d/%d %s %.3g steps/s eta %s", step, self.num_steps,
                     _values_text(values), rate, format_duration((self.num_steps - step) / rate))
        self._mark_time, self._mark_step = now, step

    def _postfix(self, values):
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if v is not None},
                             refresh=False)
