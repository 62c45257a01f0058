"""One-command reproduction report: every method against full precision, on the built-in task
(the encoder section) and on the pre-trained decoder (the decoder section).

`build_report` runs the rows and writes the outputs; `main` is ``python -m efficient_nlp.report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

from efficient_nlp.report.decoder_rows import DecoderContext, decoder_fp_row
from efficient_nlp.report.measure import (full_precision_row, load_walls, run_experiment, run_recipes_in_parallel,
                                          run_teacher, save_walls)
from efficient_nlp.report.render import (DECODER_HEADING, compose_page, format_decoder_section, format_report,
                                         format_skipped_section, load_rows, plot_pareto, save_rows, save_section)
from efficient_nlp.report.rows import Context, Row, Settings, ensure_configs_importable, row_keys

SECTIONS = ("all", "encoder", "decoder")


def _experiments():
    """The package's `experiments`, looked up at call time so that a replaced registry
    (``efficient_nlp.report.experiments = ...``, e.g. in tests) is the one that runs."""
    from efficient_nlp import report
    return report.experiments()


def _decoder_experiments():
    """The package's `decoder_experiments`, looked up at call time (as `_experiments`)."""
    from efficient_nlp import report
    return report.decoder_experiments()


class _Records:
    """``rows.json`` and ``walls.json`` of the work directory: the earlier rows and this run's."""

    def __init__(self, workdir: str):
        self.rows_path, self.walls_path = os.path.join(workdir, "rows.json"), os.path.join(workdir, "walls.json")
        self.previous = load_rows(self.rows_path)
        self.walls = load_walls(self.walls_path)   # experiment key -> wall seconds of its latest run
        self.results: dict[str, Row] = {}

    def rows(self, section: str = "") -> list[Row]:
        rows = _ordered({**self.previous, **self.results})
        return [r for r in rows if r.section == section] if section else rows

    def save(self):
        save_rows(self.rows_path, self.rows())
        save_walls(self.walls_path, self.walls)


def _selected(only: tuple, fp_key: str, exps: list) -> tuple[list, bool]:
    """The experiments ``only`` selects (row keys or key prefixes) and whether it selects anything
    of the section (its full-precision row, by its exact key, counts)."""
    if not only:
        return exps, True
    wanted = [e for e in exps if any(e.key.startswith(k) for k in only)]
    return wanted, bool(wanted) or fp_key in only


def _run_experiments(ctx, wanted: list, rec: _Records, remeasure: bool, jobs: int):
    """Runs (or remeasures) the experiments ``wanted`` of one section, saving the records after each."""
    recipes_done = {}
    if jobs > 1 and not remeasure:
        runnable = [e for e in wanted if not e.available(ctx)]
        print(f"[report] {len(runnable)} recipes, {jobs} at a time; measurements follow one by one", flush=True)
        recipes_done = run_recipes_in_parallel(runnable, ctx, jobs, rec.walls)
    for i, exp in enumerate(wanted, 1):
        if remeasure and any(k not in rec.previous or rec.previous[k].status != "ok" for k in row_keys(exp)):
            print(f"[report] {i}/{len(wanted)} {exp.key}: no earlier ok run to remeasure; kept as is", flush=True)
            continue
        print(f"[report] {i}/{len(wanted)} {exp.key} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        recipe_seconds, error = recipes_done.get(exp.key, (0.0, ""))
        if error:
            exp_rows = [Row(k, m, status="failed", note=error, run_dir=os.path.join(ctx.workdir, exp.key),
                            section=ctx.section) for k, m in zip(row_keys(exp), exp.methods)]
        else:
            exp_rows = run_experiment(exp, ctx, remeasure=remeasure or exp.key in recipes_done)
        for row in exp_rows:
            rec.results[row.key] = row
            value = f"{ctx.metric_name} {row.metric:.4f}" if row.metric is not None else row.note
            print(f"[report]   {row.method}: {row.status}, {value} ({time.perf_counter() - t0:.0f} s wall, "
                  f"{time.process_time() - c0:.0f} s CPU)", flush=True)
        if not remeasure:
            rec.walls[exp.key] = recipe_seconds + time.perf_counter() - t0
        rec.save()


def _encoder_section(rec: _Records, workdir, settings, teacher_dir, model_dir, wanted, only, remeasure, jobs,
                     plot, markdown):
    """The teacher's row and the encoder experiments ``wanted``; writes the section's plot and page."""
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
    rec.results["fp"] = full_precision_row(ctx, seconds, reused=seconds is None)
    if not remeasure or "fp" not in rec.walls:
        rec.walls["fp"] = time.perf_counter() - t_start
    print(f"[report] fp: {ctx.metric_name} {rec.results['fp'].metric:.4f}", flush=True)
    _run_experiments(ctx, wanted, rec, remeasure, jobs)
    if not only and not remeasure:
        rec.walls["_elapsed"] = dict(seconds=time.perf_counter() - t_start, jobs=jobs)
    rec.save()
    rows = rec.rows("encoder")
    plot_pareto(rows, plot, f"built-in task, {settings.name} mode", ctx.metric_name)
    page = format_report(rows, settings, teacher_dir, ctx.metric_name,
                         os.path.relpath(plot, os.path.dirname(os.path.abspath(markdown))),
                         sum(rec.walls.get(k, 0.0) for k in ["fp"] + [e.key for e in _experiments()]), remeasure,
                         rec.walls.get("_elapsed"))
    save_section(workdir, "encoder", page)


def _decoder_section(rec: _Records, workdir, settings, decoder_dir, wanted, only, remeasure, jobs, plot, markdown):
    """The decoder's row and the decoder experiments ``wanted``; writes the section's plot and
    page.  Without ``decoder_dir`` and without the default decoder
    (`efficient_nlp.models.default_decoder_dir`) the section is skipped, saying how to make it."""
    from efficient_nlp import models
    default = not decoder_dir
    if default:
        try:
            decoder_dir = models.default_decoder_dir()
        except FileNotFoundError as e:
            print(f"[report] decoder section skipped: {e}", flush=True)
            save_section(workdir, "decoder", format_skipped_section(DECODER_HEADING, str(e)))
            return
    t_start = time.perf_counter()
    print(f"[report] decoder {decoder_dir} ({settings.name} mode)", flush=True)
    ctx = DecoderContext(settings, decoder_dir, workdir)
    rec.results["lm_fp"] = decoder_fp_row(ctx)
    if not remeasure or "lm_fp" not in rec.walls:
        rec.walls["lm_fp"] = time.perf_counter() - t_start
    print(f"[report] lm_fp: perplexity {rec.results['lm_fp'].metric:.4f}", flush=True)
    _run_experiments(ctx, wanted, rec, remeasure, jobs)
    if not only and not remeasure:
        rec.walls["_elapsed_decoder"] = dict(seconds=time.perf_counter() - t_start, jobs=jobs)
    rec.save()
    rows = rec.rows("decoder")
    plot_pareto(rows, plot, f"pre-trained decoder, {settings.name} mode", "perplexity", higher_is_better=False,
                reference_key="lm_fp")
    total = sum(rec.walls.get(k, 0.0) for k in ["lm_fp"] + [e.key for e in _decoder_experiments()])
    page = format_decoder_section(rows, settings, decoder_dir, ctx.block_size, len(ctx.task.dev["input_ids"]),
                                  os.path.relpath(plot, os.path.dirname(os.path.abspath(markdown))), total,
                                  remeasure, rec.walls.get("_elapsed_decoder"), default)
    save_section(workdir, "decoder", page)


def build_report(workdir: str, settings: Settings, *, teacher_dir: str = "", model_dir: str = "",
                 decoder_dir: str = "", section: str = "all", only: tuple = (), markdown: str = "",
                 plot: str = "", remeasure: bool = False, jobs: int = 1) -> list[Row]:
    """Runs the rows of ``section`` (``all``, ``encoder`` or ``decoder``; all of them, or the keys /
    key prefixes in ``only``), writes ``rows.json``, the Markdown page and the Pareto plots;
    returns every row of both sections (earlier records kept for the others).

    The encoder section compresses ``teacher_dir`` (fine-tuned first from ``model_dir`` when
    empty; the parameter-efficient rows fine-tune ``model_dir`` itself); the decoder section
    ``decoder_dir`` ("" = `efficient_nlp.models.default_decoder_dir`;
    when that holds no decoder the section is skipped with the command that creates it).  The
    page holds both sections' tables, the one not run kept from its last run; the decoder's plot
    is ``<plot>_decoder.png``.  ``jobs`` > 1: the recipes run that many at a time in fresh
    processes (`run_recipes_in_parallel`), then every row is measured alone, so latencies stay
    comparable.  ``remeasure``: redo only the measurements of the rows from their saved outputs
    (`run_experiment`); the recorded run times stay."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; choose one of {', '.join(SECTIONS)}")
    ensure_configs_importable()
    settings = dataclasses.replace(settings, model_dir=model_dir)
    os.makedirs(workdir, exist_ok=True)
    markdown = markdown or os.path.join(workdir, "results.md")
    plot = plot or os.path.join(os.path.dirname(os.path.abspath(markdown)), "results_pareto.png")
    base, ext = os.path.splitext(plot)
    rec = _Records(workdir)
    none = ([], False)
    enc_exps, run_enc = _selected(only, "fp", _experiments()) if section != "decoder" else none
    dec_exps, run_dec = _selected(only, "lm_fp", _decoder_experiments()) if section != "encoder" else none
    if only and not (run_enc or run_dec):
        keys = (["fp"] + [e.key for e in _experiments()] if section != "decoder" else []) \
            + (["lm_fp"] + [e.key for e in _decoder_experiments()] if section != "encoder" else [])
        raise ValueError(f"--only {','.join(only)} matches no row of section {section}; row keys: " + ", ".join(keys))
    for path in (plot, markdown):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if run_enc:
        _encoder_section(rec, workdir, settings, teacher_dir, model_dir, enc_exps, only, remeasure, jobs, plot,
                         markdown)
    if run_dec:
        _decoder_section(rec, workdir, settings, decoder_dir, dec_exps, only, remeasure, jobs,
                         base + "_decoder" + (ext or ".png"), markdown)
    page = compose_page(workdir)
    with open(markdown, "w") as f:
        f.write(page)
    print(page)
    return rec.rows()


def _ordered(by_key: dict[str, Row]) -> list[Row]:
    """The rows in table order: the teacher and every encoder experiment's rows, then the decoder's."""
    order = ["fp"]
    for e in _experiments():
        order += row_keys(e)
    order.append("lm_fp")
    for e in _decoder_experiments():
        order += row_keys(e)
    return [by_key[k] for k in order if k in by_key]


def main(argv=None):
    """``python -m efficient_nlp.report``: parses the arguments and runs `build_report`."""
    p = argparse.ArgumentParser(prog="python -m efficient_nlp.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where every row's recipe writes its outputs")
    p.add_argument("--section", default="all", choices=SECTIONS, help="which table to (re)run: the encoder "
                   "methods on the built-in task, the pre-trained decoder's, or both; the page keeps the "
                   "other table from its last run")
    p.add_argument("--fast", action="store_true", help="small step counts and short sequences: the encoder "
                   "section is sized for about 30 min on 2 idle CPU cores with --teacher and --jobs 2, the "
                   "decoder section for about 10 min; the page says what it ran")
    p.add_argument("--teacher", default="", help="a fine-tuned teacher (HF dir, e.g. runs/quickstart/model); "
                   "empty: fine-tune one first with configs/quickstart.py")
    p.add_argument("--model_dir", default="", help="pretrained model to fine-tune ('' = embedded MiniLM)")
    p.add_argument("--decoder", default="", help="the decoder of the decoder section (HF dir); empty: the "
                   "default decoder configs/pretrain_causal_lm.py writes (the section is skipped without it)")
    p.add_argument("--only", default="", help="comma-separated row keys (or prefixes, e.g. qat,ptq; lm for "
                   "every decoder row) to run; the other rows keep their records in workdir/rows.json")
    p.add_argument("--remeasure", action="store_true", help="do not rerun the recipes: re-read each row's "
                   "saved outputs and redo size / cost / CPU latency (e.g. on a quiet machine)")
    p.add_argument("--markdown", default="", help="Markdown output (default workdir/results.md)")
    p.add_argument("--plot", default="", help="PNG output (default results_pareto.png next to the Markdown; "
                   "the decoder's plot: the same name ending in _decoder)")
    p.add_argument("--jobs", type=int, default=1, help="recipes run this many at a time in fresh processes "
                   "(2 suits 2 cores: much of a row is single-threaded XLA compilation); measurements "
                   "still run one at a time; each recipe's output goes to workdir/<row>/report.log")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    settings = Settings.fast() if args.fast else Settings.full()
    only = tuple(k.strip() for k in args.only.split(",") if k.strip())
    build_report(args.workdir, settings, teacher_dir=args.teacher, model_dir=args.model_dir,
                 decoder_dir=args.decoder, section=args.section, only=only, markdown=args.markdown,
                 plot=args.plot, remeasure=args.remeasure, jobs=args.jobs)
