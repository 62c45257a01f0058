"""One-command reproduction report: every method on the built-in task against full precision.

`build_report` runs the rows and writes the outputs; `main` is ``python -m efficient_nlp.report``.
"""
from __future__ import annotations

import argparse
import os
import time

from efficient_nlp.report.rows import Context, Row, Settings, ensure_configs_importable, row_keys
from efficient_nlp.report.measure import (full_precision_row, load_walls, run_experiment, run_recipes_in_parallel,
                                          run_teacher, save_walls)
from efficient_nlp.report.render import format_report, load_rows, plot_pareto, save_rows


def _experiments():
    """The package's `experiments`, looked up at call time so that a replaced registry
    (``efficient_nlp.report.experiments = ...``, e.g. in tests) is the one that runs."""
    from efficient_nlp import report
    return report.experiments()

def build_report(workdir: str, settings: Settings, *, teacher_dir: str = "", model_dir: str = "",
                 only: tuple = (), markdown: str = "", plot: str = "", remeasure: bool = False,
                 jobs: int = 1) -> list[Row]:
    """Runs the rows (all, or the keys / key prefixes in ``only``), writes ``rows.json``, the
    Markdown page and the Pareto plot; returns every row (earlier records kept for the others).
    ``jobs`` > 1: the recipes run that many at a time in fresh processes
    (`run_recipes_in_parallel`), then every row is measured alone, so latencies stay comparable.
    ``remeasure``: redo only the measurements of the rows from their saved outputs
    (`run_experiment`); the recorded run times stay."""
    ensure_configs_importable()
    os.makedirs(workdir, exist_ok=True)
    markdown = markdown or os.path.join(workdir, "results.md")
    plot = plot or os.path.join(os.path.dirname(os.path.abspath(markdown)), "results_pareto.png")
    rows_path, walls_path = os.path.join(workdir, "rows.json"), os.path.join(workdir, "walls.json")
    previous = load_rows(rows_path)
    walls = load_walls(walls_path)   # experiment key -> wall seconds of its latest run
    wanted = [e for e in _experiments() if not only or any(e.key.startswith(k) for k in only)]
    if only and not wanted and "fp" not in only:
        raise ValueError(f"--only {','.join(only)} matches no row; row keys: fp, "
                         + ", ".join(e.key for e in _experiments()))
    t_start = time.perf_counter()

    print(f"[report] full precision ({settings.name} mode)", flush=True)
    seconds = None
    if not teacher_dir and remeasure:   # the teacher an earlier run fine-tuned; never retrain it
        teacher_dir = os.path.join(workdir, "fp", "model")
        if not os.path.isdir(teacher_dir):
            raise FileNotFoundError(f"--remeasure without --teacher needs the teacher an earlier run wrote to "
                                    f"{teacher_dir}; pass --teacher DIR or run the report first")
    if not teacher_dir:
        teacher_dir, seconds = run_teacher(settings, workdir, model_dir)
    ctx = Context(settings, teacher_dir, workdir)
    results = {"fp": full_precision_row(ctx, seconds, reused=seconds is None)}
    if not remeasure or "fp" not in walls:
        walls["fp"] = time.perf_counter() - t_start
    print(f"[report] fp: {ctx.metric_name} {results['fp'].metric:.4f}", flush=True)
    recipes_done = {}
    if jobs > 1 and not remeasure:
        runnable = [e for e in wanted if not e.available(ctx)]
        print(f"[report] {len(runnable)} recipes, {jobs} at a time; measurements follow one by one", flush=True)
        recipes_done = run_recipes_in_parallel(runnable, ctx, jobs, walls)
    for i, exp in enumerate(wanted, 1):
        if remeasure and any(k not in previous or previous[k].status != "ok" for k in row_keys(exp)):
            print(f"[report] {i}/{len(wanted)} {exp.key}: no earlier ok run to remeasure; kept as is", flush=True)
            continue
        print(f"[report] {i}/{len(wanted)} {exp.key} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        recipe_seconds, error = recipes_done.get(exp.key, (0.0, ""))
        if error:
            exp_rows = [Row(k, m, status="failed", note=error, run_dir=os.path.join(workdir, exp.key))
                        for k, m in zip(row_keys(exp), exp.methods)]
        else:
            exp_rows = run_experiment(exp, ctx, remeasure=remeasure or exp.key in recipes_done)
        for row in exp_rows:
            results[row.key] = row
            value = f"{ctx.metric_name} {row.metric:.4f}" if row.metric is not None else row.note
            print(f"[report]   {row.method}: {row.status}, {value} ({time.perf_counter() - t0:.0f} s wall, "
                  f"{time.process_time() - c0:.0f} s CPU)", flush=True)
        if not remeasure:
            walls[exp.key] = recipe_seconds + time.perf_counter() - t0
        rows = _ordered({**previous, **results})
        save_rows(rows_path, rows)
        save_walls(walls_path, walls)
    elapsed = time.perf_counter() - t_start
    if not only and not remeasure:
        walls["_elapsed"] = dict(seconds=elapsed, jobs=jobs)
        save_walls(walls_path, walls)
    rows = _ordered({**previous, **results})
    save_rows(rows_path, rows)
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    plot_pareto(rows, plot, f"built-in task, {settings.name} mode", ctx.metric_name)
    page = format_report(rows, settings, teacher_dir, ctx.metric_name,
                         os.path.relpath(plot, os.path.dirname(os.path.abspath(markdown))),
                         sum(walls.get(k, 0.0) for k in ["fp"] + [e.key for e in _experiments()]), remeasure,
                         walls.get("_elapsed"))
    os.makedirs(os.path.dirname(os.path.abspath(markdown)), exist_ok=True)
    with open(markdown, "w") as f:
        f.write(page)
    print(page)
    return rows


def _ordered(by_key: dict[str, Row]) -> list[Row]:
    """The rows in table order (the teacher first, then every experiment's rows)."""
    order = ["fp"]
    for e in _experiments():
        order += row_keys(e)
    return [by_key[k] for k in order if k in by_key]


def main(argv=None):
    """``python -m efficient_nlp.report``: parses the arguments and runs `build_report`."""
    p = argparse.ArgumentParser(prog="python -m efficient_nlp.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where every row's recipe writes its outputs")
    p.add_argument("--fast", action="store_true", help="small step counts and 32-token sequences, sized for "
                   "under 30 min on 2 idle CPU cores with --teacher and --jobs 2; the page says what it ran")
    p.add_argument("--teacher", default="", help="a fine-tuned teacher (HF dir, e.g. runs/quickstart/model); "
                   "empty: fine-tune one first with configs/quickstart.py")
    p.add_argument("--model_dir", default="", help="pretrained model to fine-tune ('' = embedded MiniLM)")
    p.add_argument("--only", default="", help="comma-separated row keys (or prefixes, e.g. qat,ptq) to run; "
                   "the other rows keep their records in workdir/rows.json")
    p.add_argument("--remeasure", action="store_true", help="do not rerun the recipes: re-read each row's "
                   "saved outputs and redo size / cost / CPU latency (e.g. on a quiet machine)")
    p.add_argument("--markdown", default="", help="Markdown output (default workdir/results.md)")
    p.add_argument("--plot", default="", help="PNG output (default results_pareto.png next to the Markdown)")
    p.add_argument("--jobs", type=int, default=1, help="recipes run this many at a time in fresh processes "
                   "(2 suits 2 cores: much of a row is single-threaded XLA compilation); measurements "
                   "still run one at a time; each recipe's output goes to workdir/<row>/report.log")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    settings = Settings.fast() if args.fast else Settings.full()
    only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    build_report(args.workdir, settings, teacher_dir=args.teacher, model_dir=args.model_dir, only=only,
                 markdown=args.markdown, plot=args.plot, remeasure=args.remeasure, jobs=args.jobs)

