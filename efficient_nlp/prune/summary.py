"""Sparsity summaries: per tensor and per layer, printed and plotted to PNG.

Sparsity is read from the weights (fraction of exact zeros), which after masked training is the
mask sparsity: `pruning` sends pruned weights to exactly 0 and a kept weight is essentially never
exactly 0.  `plot_summary` draws with matplotlib (a declared dependency) through a bare
`matplotlib.figure.Figure`, so pyplot's global state and backend are left alone.
"""
from __future__ import annotations

import numpy as np

from efficient_nlp import tree as tree_lib
from efficient_nlp.prune.patterns import layer_regex


def sparsity_summary(params, rules=r"kernel$") -> list[dict]:
    """``[{"name", "shape", "size", "zeros", "sparsity"}]`` for the leaves ``rules`` select."""
    sel = tree_lib.match(params, rules, allow_unused=True)
    rows = []
    for name, leaf in tree_lib.named_leaves(params):
        if name not in sel:
            continue
        a = np.asarray(leaf)
        zeros = int(a.size - np.count_nonzero(a))
        rows.append({"name": name, "shape": tuple(a.shape), "size": int(a.size), "zeros": zeros,
                     "sparsity": zeros / max(a.size, 1)})
    return rows


def layer_summary(rows) -> dict:
    """``{"layer <i>" or "other": sparsity}`` aggregated (by element count) from `sparsity_summary`
    (a parameter's layer: its index in the layer stack of any model family, `patterns.layer_regex`)."""
    acc: dict[str, list[int]] = {}
    layer = layer_regex()
    for r in rows:
        m = layer.match(r["name"])
        key = f"layer {int(m.group(1).rpartition('.')[2]):02d}" if m else "other"
        z, s = acc.setdefault(key, [0, 0])
        acc[key] = [z + r["zeros"], s + r["size"]]
    return {k: z / max(s, 1) for k, (z, s) in sorted(acc.items())}


def format_summary(rows) -> str:
    """A text table: per tensor, per layer and in total."""
    lines = [f"{'parameter':<56}{'shape':>14}{'sparsity':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<56}{str(r['shape']):>14}{r['sparsity']:>10.3f}")
    lines.append("")
    for k, v in layer_summary(rows).items():
        lines.append(f"{k:<56}{'':>14}{v:>10.3f}")
    total = sum(r["zeros"] for r in rows) / max(sum(r["size"] for r in rows), 1)
    lines.append(f"{'total':<56}{'':>14}{total:>10.3f}")
    return "\n".join(lines)


def plot_summary(rows, path, title="sparsity per layer") -> str:
    """Bar chart of per-layer sparsity (0..1) to a PNG at ``path``; returns ``path``."""
    per_layer = layer_summary(rows)
    from matplotlib.figure import Figure  # no pyplot: the user's backend and figures are untouched

    fig = Figure(figsize=(max(4, 0.6 * len(per_layer) + 2), 3))
    ax = fig.subplots()
    ax.bar(list(per_layer), list(per_layer.values()))
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
