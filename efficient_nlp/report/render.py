"""The report's outputs: the Markdown tables and page, the metric-vs-size Pareto plots, and the
rows' JSON record (``rows.json``).

The page is one Markdown fragment per section (encoder, decoder), each kept in the work
directory when its section runs (`SECTION_FILES`), so that running one section keeps the other's
table on the page (`compose_page`)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform

from efficient_nlp.report.rows import Row, Settings

COLUMNS = ("method", "dev {metric}", "size MB", "params (nonzero)", "GFLOPs", "GBOPs", "CPU latency ms",
           "compression s", "energy Wh", "notes")
TITLE = "# Reproduction report: every method on the built-in task"


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
                     _fmt(r.seconds, 0), _fmt(r.energy_wh, 2), r.note]
        else:
            cells = [r.method] + [r.status] + [""] * (len(header) - 3) + [r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (size, metric) no other point beats: none is at most as large and
    at least as good (higher metric, or lower with ``higher_is_better=False``, e.g. perplexity)
    with one of the two strictly better; ordered by size."""
    sign = 1 if higher_is_better else -1
    signed = [(s, sign * a) for s, a in points]
    front = []
    for i, (s, a) in enumerate(signed):
        if not any((s2 <= s and a2 >= a) and (s2 < s or a2 > a) for s2, a2 in signed):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: list[Row], path: str, title: str = "", metric_name: str = "accuracy",
                higher_is_better: bool = True, reference_key: str = "fp") -> str:
    """Metric vs size (log scale): every measured row, the Pareto front as a step line and the
    full-precision row (``reference_key``) as a dashed line; a lower-is-better metric
    (perplexity) is drawn on a log scale too."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r.status == "ok" and r.metric is not None and r.size_mb]
    points = [(r.size_mb, r.metric) for r in done]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(done):
        ax.scatter(r.size_mb, r.metric, s=36, marker=markers[i % len(markers)], label=r.method, zorder=3)
    front = [points[i] for i in pareto_front(points, higher_is_better)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.6,
                label="Pareto front")
    fp = [r for r in done if r.key == reference_key]
    if fp:
        ax.axhline(fp[0].metric, color="gray", ls="--", lw=0.8, label="full precision")
    ax.set_xscale("log")
    if not higher_is_better:
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("stored size (MB, log scale)")
    ax.set_ylabel(f"dev {metric_name}" + ("" if higher_is_better else " (lower is better, log scale)"))
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
        TITLE,
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
        "counts m*n/64 FLOPs, docs/quantization.md). CPU latency: median of "
        f"{s.latency_repeats} jitted forward passes of a {s.latency_batch} x {s.max_length} batch "
        "(quantized rows through the int8 integer model). Compression s: wall time of the recipe run "
        "(PTQ rows: the reconstruction only, one-shot rows: that row's compression, as timed by the "
        "recipe; with `--jobs` > 1 two recipes shared the cores, while every measurement ran alone). "
        "Energy Wh: of the whole recipe run that produced the row (rows of one run share it; measured "
        "where the machine exposes power counters, else estimated, as the run's results.json "
        "\"compute\" section states; docs/compute.md)."
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


# ----------------------------------------------------------------------------- decoder section
DECODER_COLUMNS = ("method", "perplexity", "token accuracy", "size MB", "params (nonzero)", "MFLOPs / token",
                   "MBOPs / token", "prefill ms / token", "decode ms / token", "compression s", "energy Wh", "notes")
DECODER_HEADING = "## Decoder: the pre-trained decoder, compressed"


def format_decoder_table(rows: list[Row]) -> str:
    """The decoder section's Markdown table (held-out perplexity: lower is better)."""
    lines = ["| " + " | ".join(DECODER_COLUMNS) + " |", "|" + " --- |" * len(DECODER_COLUMNS)]
    for r in rows:
        if r.status == "ok":
            mega = (lambda v: None if v is None else v / 1e6)
            cells = [r.method, _fmt(r.metric, 2), _fmt((r.metrics or {}).get("token_accuracy"), 4),
                     _fmt(r.size_mb, 2), "" if r.params is None else f"{r.params / 1e6:.2f} M",
                     _fmt(mega(r.flops), 2), _fmt(mega(r.bops), 2), _fmt(r.latency_ms, 3), _fmt(r.decode_ms, 3),
                     _fmt(r.seconds, 0), _fmt(r.energy_wh, 2), r.note]
        else:
            cells = [r.method] + [r.status] + [""] * (len(DECODER_COLUMNS) - 3) + [r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def format_decoder_section(rows, settings: Settings, decoder_dir: str, block_size: int, eval_blocks: int,
                           plot_name: str, total_seconds: float, remeasured: bool = False,
                           elapsed: dict | None = None, default_decoder: bool = False) -> str:
    """The decoder section of the page: what ran and how; the table; the plot; how to reproduce
    (``default_decoder``: the decoder is `efficient_nlp.models.default_decoder_dir`, no ``--decoder``)."""
    s = settings
    decode = (f"decode ms / token: greedy generation of {s.lm_decode_tokens} tokens after a "
              f"{s.lm_prompt_len}-token prompt, batch 1, the first token (prefill) left out "
              "(`efficient_nlp.models.generate.decode_speed`)" if s.lm_decode_tokens else "decode not timed")
    lines = [
        DECODER_HEADING, "",
        f"Decoder `{decoder_dir}`; held-out perplexity (exp of the mean next-token NLL; **lower is better**) "
        f"and token accuracy on {eval_blocks} blocks of {block_size} tokens of the built-in corpus's "
        f"validation split (the first token of a block is not scored). Mode **{s.name}**, {s.lm_description}. "
        f"Seed {s.seed}; total wall time {total_seconds / 60:.1f} min"
        + (f"; the last run of every row took {elapsed['seconds'] / 60:.1f} min elapsed with `--jobs "
           f"{elapsed['jobs']}`" if elapsed else "") + ".",
        "",
        "Size: bytes of the saved artefact (bit-packed file for quantized rows, float32 safetensors "
        "otherwise). MFLOPs / MBOPs per token: those of one held-out block over its length. "
        f"Prefill ms / token: median of {s.latency_repeats} jitted forward passes of 1 x {block_size} tokens, "
        f"over {block_size}; {decode}; quantized rows through the int8 integer model. Compression s: wall "
        "time of the recipe run (PTQ rows: the reconstruction only, one-shot rows: that row's "
        "compression, as timed by the recipe). Energy Wh: of the whole recipe run that produced the row "
        "(measured or estimated as its results.json \"compute\" section states)."
        + (" Size, cost and latency were measured again from the saved outputs (`--remeasure`)."
           if remeasured else ""),
        "",
        format_decoder_table(rows),
        "",
        f"![held-out perplexity vs stored size]({plot_name})",
        "",
        "Reproduce: `python -m efficient_nlp.report --workdir runs/report --section decoder"
        + (" --fast" if s.name == "fast" else "") + ("" if default_decoder else f" --decoder {decoder_dir}")
        + "`; every row's "
        "`results.json` is under `runs/report/<row>/`.",
    ]
    return "\n".join(lines) + "\n"


def format_skipped_section(heading: str, reason: str) -> str:
    """A section that did not run: its heading and why (e.g. the command that creates its model)."""
    return f"{heading}\n\nSkipped:\n\n```text\n{reason.strip()}\n```\n"


# ----------------------------------------------------------------------------- the page
SECTION_FILES = {"encoder": "section_encoder.md", "decoder": "section_decoder.md"}


def save_section(workdir: str, section: str, text: str):
    """Keeps ``section``'s fragment of the page in ``workdir`` (`SECTION_FILES`)."""
    with open(os.path.join(workdir, SECTION_FILES[section]), "w") as f:
        f.write(text)


def compose_page(workdir: str) -> str:
    """The page from the section fragments in ``workdir``: the encoder page (which carries the
    title), then the decoder section; the title alone heads a page without the encoder's."""
    parts = {}
    for section, name in SECTION_FILES.items():
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path) as f:
                parts[section] = f.read()
    page = parts.get("encoder", TITLE + "\n")
    if "decoder" in parts:
        page += "\n" + parts["decoder"]
    return page


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
