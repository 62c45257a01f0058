"""The report's outputs: the Markdown table and page, the accuracy-vs-size Pareto plot, and the
rows' JSON record (``rows.json``)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform

from efficient_nlp.report.rows import Row, Settings

COLUMNS = ("method", "dev {metric}", "size MB", "params (nonzero)", "GFLOPs", "GBOPs", "CPU latency ms",
           "compression s", "notes")


def _fmt(value, digits):
    return "" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[Row], metric_name: str = "accuracy") -> str:
    """The Markdown table: one line per row; failed / unavailable rows say why in the notes."""
    header = [c.format(metric=metric_name) for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        if r.status == "ok":
            cells = [r.method, _fmt(r.metric, 4), _fmt(r.size_mb, 2),
                     "" if r.params is None else f"{r.params / 1e6:.2f} M",
                     _fmt(None if r.flops is None else r.flops / 1e9, 3),
                     _fmt(None if r.bops is None else r.bops / 1e9, 3), _fmt(r.latency_ms, 1),
                     _fmt(r.seconds, 0), r.note]
        else:
            cells = [r.method] + [r.status] + [""] * (len(header) - 3) + [r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, accuracy) no other point beats: none is at most as large and
    at least as accurate with one of the two strictly better; ordered by size."""
    front = []
    for i, (s, a) in enumerate(points):
        if not any((s2 <= s and a2 >= a) and (s2 < s or a2 > a) for s2, a2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: list[Row], path: str, title: str = "", metric_name: str = "accuracy") -> str:
    """Accuracy vs size (log scale): every measured row, the Pareto front as a step line and the
    full-precision accuracy as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "ok" and r.metric is not None and r.size_mb]
    points = [(r.size_mb, r.metric) for r in done]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(done):
        ax.scatter(r.size_mb, r.metric, s=36, marker=markers[i % len(markers)], label=r.method, zorder=3)
    front = [points[i] for i in pareto_front(points)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.6,
                label="Pareto front")
    fp = [r for r in done if r.key == "fp"]
    if fp:
        ax.axhline(fp[0].metric, color="gray", ls="--", lw=0.8, label="full precision")
    ax.set_xscale("log")
    ax.set_xlabel("stored size (MB, log scale)")
    ax.set_ylabel(f"dev {metric_name}")
    ax.set_title(title or f"dev {metric_name} vs size")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment() -> str:
    """The machine and software the report ran on, in one line."""
    import jax
    devices = jax.devices()
    return (f"{platform.platform()}, {os.cpu_count()} CPU cores visible, Python {platform.python_version()}, "
            f"jax {jax.__version__}, {len(devices)} {devices[0].platform} device(s)")


def format_report(rows, settings: Settings, teacher_dir: str, metric_name: str, plot_name: str,
                  total_seconds: float, remeasured: bool = False, elapsed: dict | None = None) -> str:
    """The Markdown page: what ran, how, on what; the table; the plot; how to reproduce."""
    s = settings
    lines = [
        "# Reproduction report: every method on the built-in task",
        "",
        f"Mode: **{s.name}**, {s.description}. Seed {s.seed}; sequence length {s.max_length}; "
        f"teacher `{teacher_dir}`; {environment()}; total wall time {total_seconds / 60:.1f} min "
        "(the sum of every row's run, measurements included; rows rerun with `--only` count their "
        "latest run)"
        + (f"; the last run of every row took {elapsed['seconds'] / 60:.1f} min elapsed with `--jobs "
           f"{elapsed['jobs']}`" if elapsed else "") + ".",
        "",
        "Size: bytes of the saved artefact (bit-packed file for quantized rows, float32 safetensors "
        "otherwise). GFLOPs / GBOPs per example of one dev sequence (BOPs: an m-bit x n-bit multiply "
        "counts m*n/64 FLOPs, METHODS.md 1.2). CPU latency: median of "
        f"{s.latency_repeats} jitted forward passes of a {s.latency_batch} x {s.max_length} batch "
        "(quantized rows through the int8 integer model). Compression s: wall time of the recipe run "
        "(PTQ rows: the reconstruction only, as timed by the recipe; with `--jobs` > 1 two recipes "
        "shared the cores, while every measurement ran alone)."
        + (" Size, cost and latency were measured again from the saved outputs (`--remeasure`), "
           "after the runs." if remeasured else ""),
        "",
        format_table(rows, metric_name),
        "",
        f"![dev {metric_name} vs stored size]({plot_name})",
        "",
        "Reproduce: `python -m efficient_nlp.report --workdir runs/report"
        + (" --fast" if s.name == "fast" else "")
        + (f" --jobs {elapsed['jobs']}" if elapsed and elapsed["jobs"] > 1 else "")
        + f" --teacher {teacher_dir}`; every row's "
        "`results.json` is under `runs/report/<row>/`.",
    ]
    return "\n".join(lines) + "\n"


def save_rows(path, rows: list[Row]):
    """``rows.json``: every row as a dict, in table order."""
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)


def load_json(path):
    """The JSON file at ``path``, or ``{}`` when there is none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_rows(path) -> dict[str, Row]:
    """``rows.json`` read back: ``{row key: Row}`` (empty when there is none)."""
    return {r["key"]: Row(**r) for r in load_json(path) or []}
