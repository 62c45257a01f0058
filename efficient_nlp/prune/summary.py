"""Sparsity summaries: per tensor and per layer, printed and plotted to PNG.

Sparsity is read from the weights (fraction of exact zeros), which after masked training is the
mask sparsity: `pruning` sends pruned weights to exactly 0 and a kept weight is essentially never
exactly 0.  `plot_summary` uses matplotlib when it is installed, else writes a plain bar chart
PNG itself (zlib + the PNG chunk format, no text) so that the recipe needs no extra dependency.
"""
from __future__ import annotations

import re
import struct
import zlib

import numpy as np

from efficient_nlp import tree as tree_lib

_LAYER = re.compile(r"layers\.(\d+)\.")


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
    """``{"layer <i>" or "other": sparsity}`` aggregated (by element count) from `sparsity_summary`."""
    acc: dict[str, list[int]] = {}
    for r in rows:
        m = _LAYER.search(r["name"])
        key = f"layer {int(m.group(1)):02d}" if m else "other"
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


def _write_png(path, rgb):
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_summary(rows, path, title="sparsity per layer") -> str:
    """Bar chart of per-layer sparsity (0..1) to a PNG at ``path``; returns ``path``."""
    per_layer = layer_summary(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        n = max(len(per_layer), 1)
        bar, gap, height = 24, 8, 200
        img = np.full((height + 20, n * (bar + gap) + gap, 3), 255, np.uint8)
        img[10 + height, :] = 0
        for k, v in enumerate(per_layer.values()):
            x0 = gap + k * (bar + gap)
            top = 10 + height - int(round(v * height))
            img[top:10 + height, x0:x0 + bar] = (31, 119, 180)
        for frac in (0.5, 0.9):
            img[10 + height - int(frac * height), ::4] = (200, 0, 0)
        _write_png(path, img)
        return path
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(per_layer) + 2), 3))
    ax.bar(list(per_layer), list(per_layer.values()))
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
