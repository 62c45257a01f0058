"""One-command reproduction report: every method on the built-in task against full precision.

    python -m efficient_nlp.report --workdir runs/report --fast --teacher runs/quickstart/model

Runs, with fixed seeds, on the built-in task with the embedded MiniLM-L6-H384 (or
``--model_dir``): full precision; QAT at W-E-A 4-4-8 / 2-2-8 / 1-1-8 (METHODS.md 1.3); PTQ by
REM, MREM-S and MREM-P at 4-4-8 and 2-2-8 (1.4); BinaryBERT, BWN vs TWS (1.5); pruning,
magnitude vs movement at 90% and heads + FFN neurons at 50% with physical removal (2.1); few-shot
pruning with and without cross distillation, one example per class (2.2); a distilled 2-layer
student (section 3).  Every row is a recipe of `efficient_nlp.recipes` run on its config file
from ``configs/`` with overrides (step counts, teacher, seed): no recipe logic lives here.

Each row's recipe writes its own ``results.json`` under ``workdir/<row key>/``; the report reads
it, then measures what the recipes do not report uniformly: size (bytes of the saved artefact:
the bit-packed file for quantized models, the float32 safetensors file otherwise), nonzero
parameters, FLOPs and BOPs per example (`efficient_nlp.quant.cost_report`, METHODS.md 1.2) and
CPU latency of the saved model (`efficient_nlp.prune.measure_latency`; quantized models through
the int8 path `efficient_nlp.quant.to_integer_model`).  A row whose recipe or method is not in
this checkout is reported as "not available" with the reason; a row that fails is reported with
its error and the others continue.  Writes ``rows.json``, a Markdown table and an
accuracy-vs-size Pareto plot (PNG).  ``--only`` reruns some rows and keeps the others' records;
``--remeasure`` redoes only the measurements from the saved outputs (latency on a quiet machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Step counts and sizes of every row; `Settings.full` keeps the configs' own values."""

    name: str
    description: str
    seed: int = 0
    max_length: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    max_train_examples: int = 0        # 0: the whole training split
    finetune_steps: int = 300          # the teacher, when none is given
    qat_steps: tuple = (200, 200)      # intermediate, prediction stage
    ptq_calibration: int = 4096
    ptq_batch_size: int = 32
    rem_steps: int = 100               # per matmul
    mrem_steps: int = 200              # per module (MREM-S and MREM-P)
    binarybert_steps: int = 0          # 0: the config's own step counts
    prune_steps: int = 300
    cd_sparsity: float = 0.9
    cd_steps: int = 300                # per layer
    distill_steps: tuple = (200, 200)  # intermediate, prediction stage
    latency_batch: int = 8
    latency_repeats: int = 10

    @classmethod
    def full(cls):
        return cls("full", "the configs' own step counts (configs/*.py)")

    @classmethod
    def fast(cls):
        s = dict(max_length=32, qat_steps=(30, 30), ptq_calibration=256, rem_steps=10, mrem_steps=20,
                 binarybert_steps=20, prune_steps=60, cd_steps=40, distill_steps=(40, 40))
        desc = ("--fast: sequences cut to 32 tokens (90% of the built-in task's texts fit; the "
                "teacher loses one dev example), QAT 30+30 steps per stage, PTQ 256 calibration rows "
                "with REM 10 steps per matmul and MREM 20 steps per module, BinaryBERT 20 steps per "
                "stage, pruning 60 steps of fine-tuning from the teacher, CD 40 steps per layer, "
                "distillation 40+40 steps (the configs use 5-15x more); numbers show directions, "
                "not converged results")
        return cls("fast", desc, **s)


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
    """One line of the table (a number is None where it does not apply or was not measured)."""

    key: str
    method: str
    status: str = "pending"           # ok | failed | not available
    metric: float | None = None
    size_mb: float | None = None
    params: int | None = None         # nonzero parameters
    flops: float | None = None        # per example
    bops: float | None = None         # per example
    latency_ms: float | None = None
    seconds: float | None = None      # wall time of the compression step
    run_dir: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A recipe run: ``build(ctx) -> config``; ``collect(ctx, config, results, run_dir, seconds) -> [Row]``.

    ``available(ctx) -> reason or None`` says why the recipe cannot run in this checkout."""

    key: str
    methods: tuple                     # the row titles it produces, in order
    build: Callable
    collect: Callable
    available: Callable = lambda ctx: None


class Context:
    """The teacher, the task and the measurement helpers every row shares."""

    def __init__(self, settings: Settings, teacher_dir: str, workdir: str):
        from efficient_nlp import data as data_lib
        from efficient_nlp import models

        self.settings, self.teacher_dir, self.workdir = settings, teacher_dir, workdir
        self.task = data_lib.load_task_data(
            "builtin", tokenizer_dir=teacher_dir, max_length=settings.max_length,
            max_train_examples=settings.max_train_examples or None)
        self.num_labels = self.task.spec.num_labels
        self.teacher = models.from_pretrained(teacher_dir, num_labels=self.num_labels)
        self.num_layers = self.teacher.config.num_hidden_layers
        self.sample = {k: v[:1] for k, v in self.task.dev.items()}
        self.metric_name = self.task.spec.metrics[0]

    # measurements ---------------------------------------------------------------
    def load(self, model_dir):
        from efficient_nlp import models
        return models.from_pretrained(model_dir, num_labels=self.num_labels)

    def cost(self, model, spec=None) -> dict:
        from efficient_nlp import quant
        return quant.cost_report(model, spec, self.sample).summary()

    def latency_ms(self, model) -> float:
        from efficient_nlp import prune
        s = self.settings
        return 1e3 * prune.measure_latency(model, batch_size=s.latency_batch, seq_len=s.max_length,
                                           repeats=s.latency_repeats)

    def float_row(self, row: Row, model, model_dir=None) -> Row:
        """Size (safetensors file, else float32 parameters), nonzero params, FLOPs, latency."""
        from efficient_nlp import models
        weights = [np.asarray(v.get_value()) for v in models.named_params(model).values()]
        cost = self.cost(model)
        row.params = int(sum(np.count_nonzero(w) for w in weights))
        row.size_mb = (_file_mb(model_dir) if model_dir else 4 * sum(w.size for w in weights) / 2 ** 20)
        row.flops, row.bops = cost["flops"], cost["bops"]
        row.latency_ms = self.latency_ms(model)
        return row

    def quantized_row(self, row: Row, spec, packed_dir: str) -> Row:
        """Packed-file size, BOPs under ``spec`` and latency of the int8 model restored from it."""
        from efficient_nlp import quant
        template, _ = quant.quantize_model(self.teacher, spec)
        quant.calibrate(template, self.sample)       # learned steps exist; restore overwrites them
        restored = quant.restore(quant.load_packed(packed_dir), template)
        imodel, _ = quant.to_integer_model(restored)
        cost = self.cost(self.teacher, spec)
        row.size_mb = quant.packed_size_mb(packed_dir)
        row.params, row.flops, row.bops = cost["params"], cost["flops"], cost["bops"]
        row.latency_ms = self.latency_ms(imodel)
        return row


def _file_mb(model_dir) -> float:
    return os.path.getsize(os.path.join(model_dir, "model.safetensors")) / 2 ** 20


def _config(module: str, *args):
    return importlib.import_module(f"configs.{module}").get_config(*args)


def _train_overrides(train, s: Settings, num_steps=None):
    """Fixed seed, batch sizes and no intermediate evaluation / checkpoints (timed runs)."""
    train.update(dict(seed=s.seed, batch_size=s.batch_size, eval_batch_size=s.eval_batch_size,
                      eval_every=0, checkpoint_every=0, tensorboard=False))
    if num_steps is not None:
        train.num_steps = int(num_steps)


def _data_overrides(data, s: Settings):
    data.task = "builtin"
    data.max_length = s.max_length
    data.max_train_examples = s.max_train_examples


def _with_steps(stages, steps):
    return [dict(stage, num_steps=int(n)) for stage, n in zip(stages, steps)]


def _metric(ctx, results: dict) -> float:
    return float(results[ctx.metric_name])


def _spec(config):
    """The `QuantSpec` a quantization recipe ran with (its ``config.quant``)."""
    from efficient_nlp import quant
    return quant.spec_from_config(config.quant.to_dict())


# ----------------------------------------------------------------------------- full precision
def run_teacher(settings: Settings, workdir: str, model_dir: str = "") -> tuple[str, float]:
    """Fine-tunes the teacher with configs/quickstart.py into ``workdir/fp``; ``(model dir, s)``."""
    from efficient_nlp.recipes import run_recipe
    config = _config("quickstart")
    config.model_dir = model_dir
    _data_overrides(config.data, settings)
    _train_overrides(config.train, settings, settings.finetune_steps)
    t0 = time.perf_counter()
    run_recipe(config, os.path.join(workdir, "fp"))
    return os.path.join(workdir, "fp", "model"), time.perf_counter() - t0


def full_precision_row(ctx: Context, seconds: float | None, reused: bool) -> Row:
    from efficient_nlp import data as data_lib
    from efficient_nlp import train as train_lib
    spec = ctx.task.spec
    eval_fn = train_lib.make_eval_fn(ctx.task.dev, ctx.settings.eval_batch_size,
                                     lambda p, y, w: data_lib.compute_metrics(spec, p, y, w))
    run_dir = os.path.join(ctx.workdir, "fp")
    row = Row("fp", "full precision (fine-tuned teacher)", status="ok", seconds=seconds, run_dir=run_dir,
              note=f"given teacher {ctx.teacher_dir}" if reused else "configs/quickstart.py")
    dev = eval_fn(ctx.teacher)
    row.metric = _metric(ctx, dev)
    if reused:  # the fine-tuning recipe wrote its own results.json otherwise
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump({"task": spec.name, "teacher_dir": ctx.teacher_dir, "dev": dev}, f, indent=2)
    return ctx.float_row(row, ctx.teacher, ctx.teacher_dir)


# ----------------------------------------------------------------------------- QAT (1.3)
def _qat(bits):
    def build(ctx):
        from configs import qat_2_2_8
        s = ctx.settings
        config = qat_2_2_8.get_config(*bits)
        config.teacher_dir = ctx.teacher_dir
        _data_overrides(config.data, s)
        _train_overrides(config.train, s)
        stages = list(config.distill.stages)
        stages[0] = dict(stages[0], matches=qat_2_2_8.intermediate_matches(ctx.num_layers))
        config.distill.stages = _with_steps(stages, s.qat_steps)
        return config

    def collect(ctx, config, results, run_dir, seconds):
        row = Row("", "", metric=_metric(ctx, results["student"]), seconds=seconds,
                  note=f"{'+'.join(str(n) for n in ctx.settings.qat_steps)} distillation steps")
        return [ctx.quantized_row(row, _spec(config), os.path.join(run_dir, "quantized"))]

    name = "-".join(map(str, bits))
    return Experiment(f"qat_{name.replace('-', '_')}", (f"QAT {name} (TernaryBERT two-stage KD)",), build, collect)


# ----------------------------------------------------------------------------- PTQ (1.4)
PTQ_METHODS = ("rem", "mrem_s", "mrem_p")
_PTQ_TITLES = {"rem": "REM", "mrem_s": "MREM-S", "mrem_p": "MREM-P"}


def _ptq_missing():
    recipe = importlib.import_module("efficient_nlp.recipes.ptq")
    return [m for m in PTQ_METHODS if m not in recipe.METHODS]


def _ptq(bits):
    name = "-".join(map(str, bits))

    def build(ctx):
        s = ctx.settings
        config = _config(f"ptq_{name.replace('-', '_')}")
        config.teacher_dir = ctx.teacher_dir
        config.ptq.method = ",".join(m for m in PTQ_METHODS if m not in _ptq_missing())
        config.ptq.update(dict(calibration_size=s.ptq_calibration, batch_size=s.ptq_batch_size, seed=s.seed))
        config.ptq.rem.steps = s.rem_steps
        config.ptq.mrem.update(dict(steps=s.mrem_steps, num_modules=min(int(config.ptq.mrem.num_modules),
                                                                         ctx.num_layers)))
        _data_overrides(config.data, s)
        _train_overrides(config.train, s)
        return config

    def collect(ctx, config, results, run_dir, seconds):
        rows = []
        for m in PTQ_METHODS:
            if m not in results["after"]:
                rows.append(Row("", "", status="not available",
                                note=f"recipe ptq has no method {m!r} in this checkout "
                                     f"(efficient_nlp.recipes.ptq.METHODS)"))
                continue
            row = Row("", "", metric=_metric(ctx, results["after"][m]), seconds=results["wall_seconds"][m],
                      note=f"{results['calibration']['size']} calibration rows; time: reconstruction only")
            rows.append(ctx.quantized_row(row, _spec(config), os.path.join(run_dir, m, "quantized")))
        return rows

    return Experiment(f"ptq_{name.replace('-', '_')}", tuple(f"PTQ {name} {_PTQ_TITLES[m]}" for m in PTQ_METHODS),
                      build, collect)


# ----------------------------------------------------------------------------- BinaryBERT (1.5)
def _binarybert_missing(ctx):
    from efficient_nlp.recipes import RECIPES
    if "binarybert" not in RECIPES:
        return "recipe binarybert is not registered in this checkout (efficient_nlp.recipes.RECIPES)"
    try:
        importlib.import_module("configs.binarybert_1_1_8")
    except ImportError as e:
        return f"configs/binarybert_1_1_8.py cannot be imported: {e}"
    return None


def _binarybert_build(ctx):
    from configs import binarybert_1_1_8
    s = ctx.settings
    config = binarybert_1_1_8.get_config()
    config.teacher_dir = ctx.teacher_dir
    config.binarybert.method = "bwn,tws"
    _data_overrides(config.data, s)
    _train_overrides(config.train, s)
    stages = list(config.distill.stages)
    stages[0] = dict(stages[0], matches=binarybert_1_1_8.intermediate_matches(ctx.num_layers))
    if s.binarybert_steps:
        stages = _with_steps(stages, (s.binarybert_steps,) * len(stages))
        config.binarybert.finetune_steps = s.binarybert_steps
    config.distill.stages = stages
    return config


def _binarybert_collect(ctx, config, results, run_dir, seconds):
    """BWN baseline and TWS rows from the recipe's Table 5.2 rows; latency of both through the
    int8 path (the TWS model restored from its packed file into the split half-width template)."""
    recipe = importlib.import_module("efficient_nlp.recipes.binarybert")
    tern_spec, bin_spec = recipe.specs(config)
    steps = f"{results['total_steps']} steps each"
    bwn = Row("", "", metric=_metric(ctx, results["rows"]["bwn"]), seconds=None, note=steps)
    ctx.quantized_row(bwn, bin_spec, os.path.join(run_dir, "bwn", "packed"))
    r = results["rows"]["tws"]
    tws = Row("", "", metric=_metric(ctx, r), size_mb=r["packed_mb"], params=int(r["params"]), flops=r["flops"],
              bops=r["bops"], note=steps + "; half-width ternary -> split (params: both binary halves) -> fine-tuned")
    structure = results["half_width"].get("structure")
    if structure:
        tws.latency_ms = ctx.latency_ms(_split_integer_model(ctx, structure, tern_spec,
                                                             os.path.join(run_dir, "tws", "packed")))
    else:
        tws.note += "; latency not measured (results.json without the half-width structure)"
    bwn.note += f"; compression s: both pipelines in one run ({seconds:.0f} s)"
    return [bwn, tws]


def _split_integer_model(ctx, structure, tern_spec, packed_dir):
    """The TWS model's int8 path: the teacher shrunk to ``structure``, quantized with the ternary
    spec, split (`quant.split_model`), filled from the packed file and made integer."""
    from efficient_nlp import prune, quant
    half, _ = prune.shrink(ctx.teacher, structure=structure)
    template, _ = quant.quantize_model(half, tern_spec)
    quant.calibrate(template, ctx.sample)         # learned steps exist; restore overwrites them
    template, _ = quant.split_model(template)
    imodel, _ = quant.to_integer_model(quant.restore(quant.load_packed(packed_dir), template))
    return imodel


BINARYBERT = Experiment("binarybert_1_1_8", ("BinaryBERT 1-1-8 BWN (direct)", "BinaryBERT 1-1-8 TWS (split)"),
                        _binarybert_build, _binarybert_collect, _binarybert_missing)


# ----------------------------------------------------------------------------- pruning (2.1)
def _prune(module, arg):
    def build(ctx):
        s = ctx.settings
        config = _config(module, arg)
        config.model_dir = ctx.teacher_dir        # prune the fine-tuned teacher while training on
        _data_overrides(config.data, s)
        _train_overrides(config.train, s, s.prune_steps)
        n = s.prune_steps
        config.prune.schedule = dict(kind="gradual_cubic", begin_step=int(config.train.warmup_ratio * n),
                                     end_step=int(0.6 * n), frequency=max(1, n // 30))
        config.prune.measure_latency = False      # the report measures every row the same way
        return config

    def collect(ctx, config, results, run_dir, seconds):
        note = f"{ctx.settings.prune_steps} steps from the teacher"
        if "shrink" in results:
            row = Row("", "", metric=_metric(ctx, results["shrink"]["dev_shrunk"]), seconds=seconds,
                      note=note + "; heads and FFN neurons physically removed")
            path = os.path.join(run_dir, "model_shrunk")
        else:
            row = Row("", "", metric=_metric(ctx, results["dev_after"]), seconds=seconds,
                      note=note + f"; {results['sparsity_total']:.0%} of encoder weights zero, stored and run dense")
            path = os.path.join(run_dir, "model")
        return [ctx.float_row(row, ctx.load(path), path)]

    return build, collect


def _prune_experiment(key, title, module, arg):
    build, collect = _prune(module, arg)
    return Experiment(key, (title,), build, collect)


# ----------------------------------------------------------------------------- cross distillation (2.2)
def _cd(method):
    def build(ctx):
        s = ctx.settings
        config = _config("cd_bert")
        config.teacher_dir = ctx.teacher_dir
        _data_overrides(config.data, s)
        config.sparsities, config.shots, config.seeds, config.methods = (s.cd_sparsity,), (1,), (s.seed,), (method,)
        config.cd.steps = s.cd_steps
        config.error_examples = 16
        config.save_models = True
        return config

    def collect(ctx, config, results, run_dir, seconds):
        run = results["runs"][0]
        row = Row("", "", metric=float(run["accuracy"]), seconds=seconds,
                  note=f"1 example per class, {run['sparsity']:.0%} unstructured, {ctx.settings.cd_steps} steps "
                       "per layer; stored and run dense")
        return [ctx.float_row(row, ctx.load(run["model_dir"]), run["model_dir"])]

    title = {"cd": "few-shot pruning, cross distillation", "wo_cd": "few-shot pruning, w/o CD"}[method]
    return Experiment({"cd": "fewshot_cd", "wo_cd": "fewshot_wo_cd"}[method], (title,), build, collect)


# ----------------------------------------------------------------------------- distillation (3)
def _distill_build(ctx):
    """A 2-layer student initialised from the last teacher layer of each half (TinyBERT two-stage):
    hidden states on the uniform map, attention scores of the same layers, then soft CE."""
    from efficient_nlp.distill import layer_matches, uniform_hidden_map
    s = ctx.settings
    config = _config("distill_two_stage")
    config.teacher_dir = ctx.teacher_dir
    _data_overrides(config.data, s)
    _train_overrides(config.train, s)
    k = ctx.num_layers // 2
    if k < 1:
        raise ValueError(f"a 2-layer student needs a teacher of >= 2 layers, got {ctx.num_layers}")
    config.student.layers = (k - 1, 2 * k - 1)
    stages = list(config.distill.stages)
    stages[0] = dict(stages[0], matches=layer_matches("hidden", "hidden_mse", uniform_hidden_map(2 * k, 2))
                     + layer_matches("attn_scores", "attention_mse", [(0, k - 1), (1, 2 * k - 1)]))
    config.distill.stages = _with_steps(stages, s.distill_steps)
    return config


def _distill_collect(ctx, config, results, run_dir, seconds):
    path = os.path.join(run_dir, "student")
    row = Row("", "", metric=_metric(ctx, results["student"]), seconds=seconds,
              note=f"teacher layers {results['student_layers']}, "
                   f"{'+'.join(str(n) for n in ctx.settings.distill_steps)} steps")
    return [ctx.float_row(row, ctx.load(path), path)]


DISTILL = Experiment("distill_2l", ("distilled 2-layer student (two-stage KD)",), _distill_build, _distill_collect)


# ----------------------------------------------------------------------------- the list
def experiments() -> list[Experiment]:
    """Every experiment of the report, in table order."""
    return [
        _qat((4, 4, 8)), _qat((2, 2, 8)), _qat((1, 1, 8)),
        _ptq((4, 4, 8)), _ptq((2, 2, 8)),
        BINARYBERT,
        _prune_experiment("prune_magnitude_90", "pruning, magnitude 90% unstructured", "prune_magnitude", "0.9"),
        _prune_experiment("prune_movement_90", "pruning, movement 90% unstructured", "prune_movement", "0.9"),
        _prune_experiment("prune_structured_50", "pruning, 50% heads + FFN neurons, shrunk", "prune_structured", "0.5"),
        _cd("wo_cd"), _cd("cd"),
        DISTILL,
    ]


def _row_keys(exp: Experiment) -> list[str]:
    return [exp.key] if len(exp.methods) == 1 else [f"{exp.key}_{i}" for i in range(len(exp.methods))]


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


def run_experiment(exp: Experiment, ctx: Context, *, remeasure: bool = False) -> list[Row]:
    """Runs one experiment; its rows are ``ok``, ``failed`` (with the error) or ``not available``.

    ``remeasure``: the recipe is not rerun; its saved ``results.json`` (and the recipe's wall
    time in ``report_seconds.json``) are read back and only the measurements (size, cost, CPU
    latency) are redone, e.g. on a quiet machine after a run that shared the CPU."""
    run_dir = os.path.join(ctx.workdir, exp.key)
    keys = _row_keys(exp)

    def fill(rows):
        for row, key, title in zip(rows, keys, exp.methods):
            row.key, row.method, row.run_dir = key, title, row.run_dir or run_dir
            if row.status == "pending":
                row.status = "ok"
        return rows

    reason = exp.available(ctx)
    if reason:
        return fill([Row("", "", status="not available", note=reason) for _ in exp.methods])
    try:
        if remeasure:
            config = exp.build(ctx)
            results = _load_json(os.path.join(run_dir, "results.json"))
            seconds = _load_json(os.path.join(run_dir, "report_seconds.json"))
            if not results or "seconds" not in seconds:
                raise FileNotFoundError(f"--remeasure needs {run_dir}/results.json and report_seconds.json "
                                        "from an earlier run of this row; run it without --remeasure first")
            seconds = seconds["seconds"]
        else:
            config, results, seconds = _run_recipe(exp, ctx)
        return fill(exp.collect(ctx, config, results, run_dir, seconds))
    except Exception as e:  # a failed row is reported; the others continue
        return fill([Row("", "", status="failed", note=_failed(exp, run_dir, e)) for _ in exp.methods])


# ----------------------------------------------------------------------------- parallel rows
# Relative recipe wall times of the --fast rows (session-4 measurements, seconds): the pool starts
# the longest first so that two workers finish together.
_TYPICAL_SECONDS = {"ptq": 600, "binarybert": 460, "fewshot_cd": 420, "prune": 320, "distill": 320,
                    "fewshot_wo_cd": 300, "qat": 200}


def _typical_seconds(key: str, walls: dict) -> float:
    return walls.get(key) or max((v for k, v in _TYPICAL_SECONDS.items() if key.startswith(k)), default=0)


def _recipe_worker(settings: Settings, teacher_dir: str, workdir: str, key: str) -> tuple[str, float, str]:
    """Runs one row's recipe in a fresh process (``--jobs``), its output in ``workdir/<key>/report.log``;
    returns ``(key, seconds, error message or "")``.  Measurements are left to the parent."""
    run_dir = os.path.join(workdir, key)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "report.log"), "w", buffering=1) as log:   # line-buffered
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        exp = next(e for e in experiments() if e.key == key)
        t0 = time.perf_counter()
        try:
            _ensure_configs_importable()
            _run_recipe(exp, Context(settings, teacher_dir, workdir))
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
        futures = [pool.submit(_recipe_worker, ctx.settings, ctx.teacher_dir, ctx.workdir, e.key) for e in order]
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            key, seconds, error = future.result()
            log = os.path.join(ctx.workdir, key, "report.log")
            print(f"[report] recipe {n}/{len(order)} {key}: {'FAILED ' + error if error else 'done'} "
                  f"({seconds:.0f} s; log {log})", flush=True)
            done[key] = (seconds, error)
    return done


# ----------------------------------------------------------------------------- outputs
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


def _save_rows(path, rows):
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=2)


def _load_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _load_rows(path) -> dict[str, Row]:
    return {r["key"]: Row(**r) for r in _load_json(path) or []}


# ----------------------------------------------------------------------------- main
def _ensure_configs_importable():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "configs")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        importlib.import_module("configs.quickstart")
    except ImportError as e:
        raise RuntimeError("the report runs the recipes from their configs/ files: run it from a checkout "
                           "of the repository (pip install -e .), not from a wheel") from e


def build_report(workdir: str, settings: Settings, *, teacher_dir: str = "", model_dir: str = "",
                 only: tuple = (), markdown: str = "", plot: str = "", remeasure: bool = False,
                 jobs: int = 1) -> list[Row]:
    """Runs the rows (all, or the keys / key prefixes in ``only``), writes ``rows.json``, the
    Markdown page and the Pareto plot; returns every row (earlier records kept for the others).
    ``jobs`` > 1: the recipes run that many at a time in fresh processes
    (`run_recipes_in_parallel`), then every row is measured alone, so latencies stay comparable.
    ``remeasure``: redo only the measurements of the rows from their saved outputs
    (`run_experiment`); the recorded run times stay."""
    _ensure_configs_importable()
    os.makedirs(workdir, exist_ok=True)
    markdown = markdown or os.path.join(workdir, "results.md")
    plot = plot or os.path.join(os.path.dirname(os.path.abspath(markdown)), "results_pareto.png")
    rows_path, walls_path = os.path.join(workdir, "rows.json"), os.path.join(workdir, "walls.json")
    previous = _load_rows(rows_path)
    walls = _load_json(walls_path)   # experiment key -> wall seconds of its latest run
    wanted = [e for e in experiments() if not only or any(e.key.startswith(k) for k in only)]
    if only and not wanted and "fp" not in only:
        raise ValueError(f"--only {','.join(only)} matches no row; row keys: fp, "
                         + ", ".join(e.key for e in experiments()))
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
        if remeasure and any(k not in previous or previous[k].status != "ok" for k in _row_keys(exp)):
            print(f"[report] {i}/{len(wanted)} {exp.key}: no earlier ok run to remeasure; kept as is", flush=True)
            continue
        print(f"[report] {i}/{len(wanted)} {exp.key} ...", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        recipe_seconds, error = recipes_done.get(exp.key, (0.0, ""))
        if error:
            exp_rows = [Row(k, m, status="failed", note=error, run_dir=os.path.join(workdir, exp.key))
                        for k, m in zip(_row_keys(exp), exp.methods)]
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
        _save_rows(rows_path, rows)
        with open(walls_path, "w") as f:
            json.dump(walls, f, indent=2)
    elapsed = time.perf_counter() - t_start
    if not only and not remeasure:
        walls["_elapsed"] = dict(seconds=elapsed, jobs=jobs)
        with open(walls_path, "w") as f:
            json.dump(walls, f, indent=2)
    rows = _ordered({**previous, **results})
    _save_rows(rows_path, rows)
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    plot_pareto(rows, plot, f"built-in task, {settings.name} mode", ctx.metric_name)
    page = format_report(rows, settings, teacher_dir, ctx.metric_name,
                         os.path.relpath(plot, os.path.dirname(os.path.abspath(markdown))),
                         sum(walls.get(k, 0.0) for k in ["fp"] + [e.key for e in experiments()]), remeasure,
                         walls.get("_elapsed"))
    os.makedirs(os.path.dirname(os.path.abspath(markdown)), exist_ok=True)
    with open(markdown, "w") as f:
        f.write(page)
    print(page)
    return rows


def _ordered(by_key: dict[str, Row]) -> list[Row]:
    order = ["fp"]
    for e in experiments():
        order += _row_keys(e)
    return [by_key[k] for k in order if k in by_key]


def main(argv=None):
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


if __name__ == "__main__":
    main()
