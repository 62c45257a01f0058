"""Running the report's rows: the teacher, each row's recipe (in process, or several at a time
in fresh processes with ``--jobs``) and the measurements of its outputs.

A row whose recipe or method is not in this checkout is "not available" with the reason; a row
that fails keeps its error (traceback in ``error.txt``) and the others continue.  ``remeasure``
redoes only the measurements from a row's saved ``results.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from efficient_nlp.report.rows import (Context, Experiment, Row, Settings, ensure_configs_importable,
                                              experiments, row_keys, teacher_config)
from efficient_nlp.report.render import load_json

# ----------------------------------------------------------------------------- full precision
def run_teacher(settings: Settings, workdir: str, model_dir: str = "") -> tuple[str, float]:
    """Fine-tunes the teacher with configs/quickstart.py into ``workdir/fp``; ``(model dir, s)``."""
    from efficient_nlp.recipes import run_recipe
    config = teacher_config(settings, model_dir)
    t0 = time.perf_counter()
    run_recipe(config, os.path.join(workdir, "fp"))
    return os.path.join(workdir, "fp", "model"), time.perf_counter() - t0


def full_precision_row(ctx: Context, seconds: float | None, reused: bool) -> Row:
    """The teacher's row: its dev metric (written to ``workdir/fp/results.json`` when the teacher
    was given) and its measurements."""
    from efficient_nlp import data as data_lib
    from efficient_nlp import train as train_lib
    spec = ctx.task.spec
    eval_fn = train_lib.make_eval_fn(ctx.task.dev, ctx.settings.eval_batch_size,
                                     lambda p, y, w: data_lib.compute_metrics(spec, p, y, w))
    run_dir = os.path.join(ctx.workdir, "fp")
    row = Row("fp", "full precision (fine-tuned teacher)", status="ok", seconds=seconds, run_dir=run_dir,
              note=f"given teacher {ctx.teacher_dir}" if reused else "configs/quickstart.py")
    dev = eval_fn(ctx.teacher)
    row.metric = float(dev[ctx.metric_name])
    if reused:  # the fine-tuning recipe wrote its own results.json otherwise
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump({"task": spec.name, "teacher_dir": ctx.teacher_dir, "dev": dev}, f, indent=2)
    return ctx.float_row(row, ctx.teacher, ctx.teacher_dir)


# ----------------------------------------------------------------------------- one row
def _failed(exp: Experiment, run_dir: str, error: BaseException) -> str:
    """Writes the traceback to ``run_dir/error.txt``; returns the one-line message for the table."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "error.txt"), "w") as f:
        f.write("".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def _run_recipe(exp: Experiment, ctx: Context):
    """Builds the row's config and runs its recipe; records the wall time in ``report_seconds.json``."""
    from efficient_nlp.recipes import run_recipe
    run_dir = os.path.join(ctx.workdir, exp.key)
    config = exp.build(ctx)
    t0 = time.perf_counter()
    results = run_recipe(config, run_dir)
    seconds = time.perf_counter() - t0
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "report_seconds.json"), "w") as f:
        json.dump({"seconds": seconds}, f)
    return config, results, seconds


def _with_energy(rows: list[Row], results) -> list[Row]:
    """Each row's ``energy_wh``, unless set: the energy of the recipe run that produced it (the
    ``compute`` section `efficient_nlp.recipes.run_recipe` adds to results.json; rows of one run
    share it)."""
    energy = ((results or {}).get("compute") or {}).get("energy_kwh") if isinstance(results, dict) else None
    for row in rows:
        if row.energy_wh is None and energy is not None:
            row.energy_wh = 1e3 * float(energy)
    return rows


def run_experiment(exp: Experiment, ctx: Context, *, remeasure: bool = False) -> list[Row]:
    """Runs one experiment; its rows are ``ok``, ``failed`` (with the error) or ``not available``.

    ``remeasure``: the recipe is not rerun; its saved ``results.json`` (and the recipe's wall
    time in ``report_seconds.json``) are read back and only the measurements (size, cost, CPU
    latency) are redone, e.g. on a quiet machine after a run that shared the CPU."""
    run_dir = os.path.join(ctx.workdir, exp.key)
    keys = row_keys(exp)

    def fill(rows):
        for row, key, title in zip(rows, keys, exp.methods):
            row.key, row.method, row.run_dir = key, title, row.run_dir or run_dir
            row.section = getattr(ctx, "section", "encoder")
            if row.status == "pending":
                row.status = "ok"
        return rows

    reason = exp.available(ctx)
    if reason:
        return fill([Row("", "", status="not available", note=reason) for _ in exp.methods])
    try:
        if remeasure:
            config = exp.build(ctx)
            results = load_json(os.path.join(run_dir, "results.json"))
            seconds = load_json(os.path.join(run_dir, "report_seconds.json"))
            if not results or "seconds" not in seconds:
                raise FileNotFoundError(f"--remeasure needs {run_dir}/results.json and report_seconds.json "
                                        "from an earlier run of this row; run it without --remeasure first")
            seconds = seconds["seconds"]
        else:
            config, results, seconds = _run_recipe(exp, ctx)
        return fill(_with_energy(exp.collect(ctx, config, results, run_dir, seconds), results))
    except Exception as e:  # a failed row is reported; the others continue
        return fill([Row("", "", status="failed", note=_failed(exp, run_dir, e)) for _ in exp.methods])


# ----------------------------------------------------------------------------- parallel rows
# Relative recipe wall times of the --fast rows (measured runs, seconds), used until a row has a
# recorded wall time: the pool starts the longest first so that two workers finish together.
_TYPICAL_SECONDS = {"oneshot": 830, "ptq": 600, "binarybert": 460, "fewshot_cd": 420, "prune": 320, "distill": 320,
                    "fewshot_wo_cd": 300, "qat": 200, "lm_oneshot": 610, "lm_ptq": 150, "lm_qat": 120,
                    "lm_prune": 90, "lm_distill": 90, "lowrank": 400, "sharing": 250,
                    "peft": 300}


def load_walls(path) -> dict:
    """``walls.json``: row key -> wall seconds of its latest run (``_elapsed``: the last full run)."""
    return load_json(path)


def save_walls(path, walls: dict):
    with open(path, "w") as f:
        json.dump(walls, f, indent=2)


def _typical_seconds(key: str, walls: dict) -> float:
    return walls.get(key) or max((v for k, v in _TYPICAL_SECONDS.items() if key.startswith(k)), default=0)


def section_of(section: str):
    """``(experiments, context class)`` of a section of the report: encoder or decoder."""
    from efficient_nlp.report.decoder_rows import DecoderContext, decoder_experiments
    if section not in ("encoder", "decoder"):
        raise ValueError(f"unknown report section {section!r}; choose encoder or decoder")
    return (experiments(), Context) if section == "encoder" else (decoder_experiments(), DecoderContext)


def _recipe_worker(settings: Settings, teacher_dir: str, workdir: str, key: str,
                   section: str = "encoder") -> tuple[str, float, str]:
    """Runs one row's recipe in a fresh process (``--jobs``), its output in ``workdir/<key>/report.log``;
    returns ``(key, seconds, error message or "")``.  Measurements are left to the parent."""
    run_dir = os.path.join(workdir, key)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "report.log"), "w", buffering=1) as log:   # line-buffered
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        exps, context = section_of(section)
        exp = next(e for e in exps if e.key == key)
        t0 = time.perf_counter()
        try:
            ensure_configs_importable()
            _run_recipe(exp, context(settings, teacher_dir, workdir))
            return key, time.perf_counter() - t0, ""
        except Exception as e:
            traceback.print_exc()
            return key, time.perf_counter() - t0, _failed(exp, run_dir, e)


def run_recipes_in_parallel(exps: list[Experiment], ctx: Context, jobs: int, walls: dict) -> dict[str, tuple]:
    """Runs the recipes of ``exps`` in ``jobs`` fresh processes at a time (longest first); returns
    ``{key: (seconds, error message or "")}``.  Each process sees all the cores: rows spend
    much of their time compiling single-threaded, so two at a time use 2 cores far better."""
    import concurrent.futures
    import multiprocessing

    done = {}
    order = sorted(exps, key=lambda e: -_typical_seconds(e.key, walls))
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                  max_tasks_per_child=1)
    with pool:
        section = getattr(ctx, "section", "encoder")
        futures = [pool.submit(_recipe_worker, ctx.settings, ctx.teacher_dir, ctx.workdir, e.key, section)
                   for e in order]
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            key, seconds, error = future.result()
            log = os.path.join(ctx.workdir, key, "report.log")
            print(f"[report] recipe {n}/{len(order)} {key}: {'FAILED ' + error if error else 'done'} "
                  f"({seconds:.0f} s; log {log})", flush=True)
            done[key] = (seconds, error)
    return done

