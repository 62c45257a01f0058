"""PNG plot of pre-training runs by compute (matplotlib, Agg): the loss against the training
FLOPs spent so far and against wall-clock seconds, one line per run, with the points where a
run grew (progressive stacking, Gong et al. 2019) marked by dotted vertical lines.

Comparing runs by compute instead of by step is what progressive stacking is about: a shallow
model's step costs a fraction of the deep model's, so at equal steps the stacked run has spent
less; the FLOPs panel compares the work, the wall-clock panel what it cost on this machine.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclasses.dataclass(frozen=True)
class LossCurve:
    """One run: ``loss[k]`` measured after ``flops[k]`` training FLOPs and ``seconds[k]``
    wall-clock seconds (both cumulative).  ``events``: ``(flops, seconds, label)`` of points
    where the run changed, e.g. ``(3.2e12, 41.0, "3 -> 6 layers")`` when it was stacked."""

    flops: tuple[float, ...]
    seconds: tuple[float, ...]
    loss: tuple[float, ...]
    events: tuple[tuple[float, float, str], ...] = ()

    @classmethod
    def from_points(cls, points: Sequence[Sequence[float]], events=()) -> "LossCurve":
        """From ``[(flops, seconds, loss), ...]``."""
        rows = [tuple(p) for p in points]
        bad = [i for i, p in enumerate(rows) if len(p) != 3]
        if bad:
            raise ValueError(f"each point must be (flops, wall_seconds, loss); point {bad[0]} has "
                             f"{len(rows[bad[0]])} values: {rows[bad[0]]!r}")
        return cls(tuple(p[0] for p in rows), tuple(p[1] for p in rows), tuple(p[2] for p in rows),
                   tuple(events))


def _finite(values, what: str, name: str, *, nonnegative: bool) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"run {name!r}: {what}[{i}] = {v!r} is not a number") from None
        if not math.isfinite(x) or (nonnegative and x < 0):
            need = "a finite number >= 0" if nonnegative else "finite"
            raise ValueError(f"run {name!r}: {what}[{i}] = {v!r} must be {need}")
        out.append(x)
    return out


def _curve(name: str, run) -> LossCurve:
    curve = run if isinstance(run, LossCurve) else LossCurve.from_points(run)
    n = len(curve.loss)
    if not (len(curve.flops) == len(curve.seconds) == n):
        raise ValueError(f"run {name!r}: flops, seconds and loss need one value per point; got "
                         f"{len(curve.flops)}, {len(curve.seconds)} and {n}")
    if n == 0:
        raise ValueError(f"run {name!r} has no points; record (flops, wall_seconds, loss) at least once")
    for k, event in enumerate(curve.events):
        if len(tuple(event)) != 3:
            raise ValueError(f"run {name!r}: event {k} must be (flops, wall_seconds, label), got {event!r}")
    return LossCurve(tuple(_finite(curve.flops, "flops", name, nonnegative=True)),
                     tuple(_finite(curve.seconds, "seconds", name, nonnegative=True)),
                     tuple(_finite(curve.loss, "loss", name, nonnegative=False)),
                     tuple((float(f), float(s), str(label)) for f, s, label in curve.events))


def plot_loss_vs_compute(runs: Mapping[str, LossCurve | Sequence[Sequence[float]]], path, *,
                         title: str | None = None, loss_name: str = "training loss"):
    """Write a PNG (1000 x 360 pixels) with two panels: ``loss_name`` against training FLOPs
    (left) and against wall-clock seconds (right), one line per run; each run's ``events`` are
    dotted vertical lines in its colour, labelled.  ``runs``: ``{name: LossCurve}`` or
    ``{name: [(flops, wall_seconds, loss), ...]}``.  Returns ``path``.  Raises ValueError for no
    runs, a run without points, mismatched lengths, or a non-finite / negative value."""
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty mapping {name: LossCurve or [(flops, wall_seconds, loss), ...]}; "
                         f"got {runs!r}")
    curves = {str(name): _curve(str(name), run) for name, run in runs.items()}
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, c in curves.items():
        marker = "o" if len(c.loss) < 30 else None
        (line,) = a1.plot(c.flops, c.loss, marker=marker, ms=3, label=name)
        a2.plot(c.seconds, c.loss, marker=marker, ms=3, color=line.get_color(), label=name)
        for f, s, label in c.events:
            for ax, x in ((a1, f), (a2, s)):
                ax.axvline(x, color=line.get_color(), ls=":", lw=1)
                ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                            textcoords="offset points", fontsize=7, color=line.get_color())
    a1.set_xlabel("training FLOPs")
    a1.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    a2.set_xlabel("wall-clock seconds")
    for ax in (a1, a2):
        ax.set_ylabel(loss_name)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(title or f"{loss_name} against compute")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["LossCurve", "plot_loss_vs_compute"]
