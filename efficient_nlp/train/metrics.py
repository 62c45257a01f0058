"""Scalar metrics: TensorBoard (tensorboardX) and ``metrics.jsonl``, written by process 0.

``metrics.jsonl`` holds one JSON object per ``write`` call: ``{"step": int, name: float,
...}``. Other processes construct the writer too (so calls stay symmetric) but write
nothing.
"""
import json
import logging
import math
import os

import jax
import numpy as np

log = logging.getLogger(__name__)


def _to_float(value):
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"metrics must be scalars, got an array of shape {value.shape}")
    return float(value.reshape(()))


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files.

    Args:
      workdir: directory for ``metrics.jsonl`` and the event files (created if needed).
      tensorboard: also write TensorBoard events (needs ``tensorboardX``; if it cannot be
        imported, a warning is logged and only the JSONL file is written).
      enabled: None = only on process 0.
    """

    def __init__(self, workdir, *, tensorboard=True, enabled=None):
        self.workdir = workdir
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(logdir=workdir)
            except Exception as e:  # ImportError, or a broken optional torch import
                log.warning("TensorBoard disabled (tensorboardX unavailable: %s)", e)

    def write(self, step, scalars):
        """Writes ``scalars`` (name -> number) at ``step``; returns the record written."""
        record = {"step": int(step)}
        for name, value in scalars.items():
            record[str(name)] = _to_float(value)
        if not self.enabled:
            return record
        self._jsonl.write(json.dumps(
            {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
             for k, v in record.items()}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step":
                    self._tb.add_scalar(name, value, int(step))
        return record

    def flush(self):
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(workdir):
    """Reads ``workdir/metrics.jsonl`` back as a list of dicts."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
