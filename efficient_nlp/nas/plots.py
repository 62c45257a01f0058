"""PNG plots of a search (matplotlib, Agg): decision probabilities, Phi / gradient alignment,
accuracy curves.  Inputs are the metric records of ``metrics.jsonl`` (``train.read_metrics``)."""
from __future__ import annotations

import math
import os


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_decisions(records, decisions, candidates, path, *, warmup_steps=None, title=""):
    """One panel per decision: the controller's probability of each candidate over the search."""
    plt = _plt()
    n = len(decisions)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for d, name in enumerate(decisions):
        ax = axes[d // cols][d % cols]
        for a, width in enumerate(candidates[d]):
            xs, ys = _series(records, f"prob/{name}/{a}")
            ax.plot(xs, ys, label=str(width))
        if warmup_steps:
            ax.axvline(warmup_steps, color="gray", ls=":", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, title="width", title_fontsize=6)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title or "controller decision probabilities")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sharing(records, path, *, warmup_steps=None, title=""):
    """Phi (left) and the gradient cosine of the widest vs second-widest architecture (right)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot(*_series(records, "phi"))
    a1.set_title("sharing level Phi")
    a2.plot(*_series(records, "grad_alignment"))
    a2.set_title("gradient cosine (widest vs 2nd widest)")
    for ax in (a1, a2):
        ax.set_xlabel("step")
        if warmup_steps:
            ax.axvline(warmup_steps, color="gray", ls=":", lw=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(search_records, retrain_records, path, *, title=""):
    """Search: training accuracy of the sampled architectures, mean validation accuracy of the
    controller's samples; retraining: test accuracy of the chosen architecture."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot(*_series(search_records, "accuracy"), label="train (sampled arch)")
    a1.plot(*_series(search_records, "val_accuracy_sampled"), label="val (controller samples)")
    a1.set_title("search")
    a1.legend(fontsize=7)
    a2.plot(*_series(retrain_records or [], "accuracy"), label="train")
    a2.plot(*_series(retrain_records or [], "eval/accuracy"), label="test", marker="o")
    a2.set_title("retraining the chosen architecture")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_all(workdir, search_records, retrain_records, space, warmup_steps, title=""):
    """Writes ``decisions.png``, ``sharing.png``, ``accuracy.png`` into ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    return [plot_decisions(search_records, space.decisions, space.candidates,
                           os.path.join(workdir, "decisions.png"), warmup_steps=warmup_steps,
                           title=title),
            plot_sharing(search_records, os.path.join(workdir, "sharing.png"),
                         warmup_steps=warmup_steps, title=title),
            plot_accuracy(search_records, retrain_records, os.path.join(workdir, "accuracy.png"),
                          title=title)]
