"""The report's rows: settings, the row record, and one `Experiment` per recipe run.

Every row is a recipe of `efficient_nlp.recipes` run on its config file from ``configs/`` with
overrides (step counts, teacher, seed, the teacher's layer count read from the model): no recipe
logic lives here.  `experiments` lists them in table order; `Context` holds the teacher, the
task and the measurements every row shares.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Step counts and sizes of every row; `Settings.full` keeps the configs' own values."""

    name: str
    description: str
    seed: int = 0
    model_dir: str = ""                # the pretrained model ("" = the embedded MiniLM): the teacher's and PEFT rows' start
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
    oneshot_calibration: int = 128     # one-shot rows: calibration rows (the literature's 128)
    oneshot_mrem_steps: int = 100      # per module, GPTQ + MREM-S
    lowrank_steps: tuple = (200, 200)  # SVD rows: intermediate, prediction stage of the recovery
    sharing_steps: tuple = (200, 200)  # sharing row: the same
    peft_steps: int = 300              # LoRA / QLoRA rows: fine-tuning steps
    early_exit_steps: int = 300        # early-exit row: steps training the exits
    token_skip_steps: tuple = (200, 100)  # token-skipping rows: soft stage, hard stage
    latency_batch: int = 8
    latency_repeats: int = 10
    # The decoder section (0 or (): the value of its configs/lm_*.py file).
    lm_description: str = "the configs' own step counts (configs/lm_*.py)"
    lm_block_size: int = 0             # tokens per block (the configs': 128)
    lm_max_documents: int = 0          # training documents read (0: all)
    lm_eval_blocks: int = 0            # held-out blocks scored (the configs': 64)
    lm_batch_size: int = 0             # training batch (blocks)
    lm_qat_steps: tuple = ()           # intermediate, prediction stage
    lm_ptq_calibration: int = 0
    lm_rem_steps: int = 0              # per matmul
    lm_mrem_steps: int = 0             # per module
    lm_prune_steps: int = 0
    lm_distill_steps: tuple = ()       # intermediate, prediction stage
    lm_oneshot_calibration: int = 0    # one-shot rows: calibration blocks
    lm_oneshot_mrem_steps: int = 0     # per module, GPTQ + MREM-S
    lm_prompt_len: int = 32            # decode timing: prompt tokens ...
    lm_decode_tokens: int = 32         # ... and greedily generated tokens (0: decode not timed)

    @classmethod
    def full(cls):
        return cls("full", "the configs' own step counts (configs/*.py)")

    @classmethod
    def fast(cls):
        s = dict(max_length=32, qat_steps=(30, 30), ptq_calibration=256, rem_steps=10, mrem_steps=20,
                 binarybert_steps=20, prune_steps=60, cd_steps=40, distill_steps=(40, 40),
                 oneshot_mrem_steps=20, lowrank_steps=(40, 40), sharing_steps=(40, 40), peft_steps=100,
                 early_exit_steps=100, token_skip_steps=(60, 40),
                 lm_max_documents=1000, lm_eval_blocks=32, lm_batch_size=8, lm_qat_steps=(20, 20),
                 lm_ptq_calibration=64, lm_rem_steps=10, lm_mrem_steps=20, lm_prune_steps=40,
                 lm_distill_steps=(20, 20), lm_oneshot_calibration=64, lm_oneshot_mrem_steps=20,
                 lm_prompt_len=16, lm_decode_tokens=16)
        desc = ("--fast: sequences cut to 32 tokens (90% of the built-in task's texts fit; the "
                "teacher loses one dev example), QAT 30+30 steps per stage, PTQ 256 calibration rows "
                "with REM 10 steps per matmul and MREM 20 steps per module, BinaryBERT 20 steps per "
                "stage, pruning 60 steps of fine-tuning from the teacher, CD 40 steps per layer, "
                "distillation 40+40 steps (the configs use 5-15x more), one-shot rows on 128 "
                "calibration rows with MREM-S 20 steps per module, SVD and sharing recovered by "
                "40+40 distillation steps, LoRA / QLoRA 100 steps; numbers show directions, "
                "not converged results")
        lm_desc = ("--fast: 1000 training documents, 32 held-out blocks of 128 tokens, batches of 8 "
                   "blocks, QAT 20+20 steps, PTQ 64 calibration blocks with REM 10 steps per matmul and "
                   "MREM-S 20 steps per module, pruning 40 steps, distillation 20+20 steps (the configs "
                   "use 4-10x more), one-shot rows on 64 calibration blocks with MREM-S 20 steps per "
                   "module; numbers show directions, not converged results")
        return cls("fast", desc, lm_description=lm_desc, **s)


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
    section: str = "encoder"          # encoder | decoder (the table it belongs to)
    metrics: dict = dataclasses.field(default_factory=dict)   # decoder rows: perplexity, nll, token_accuracy
    decode_ms: float | None = None    # decoder rows: greedy decoding, ms per generated token
    energy_wh: float | None = None    # energy of the recipe run (its results.json "compute")


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

    section = "encoder"
    higher_is_better = True            # of the table's metric (accuracy)

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
        from efficient_nlp import train
        s = self.settings
        batch = train.token_batch(model.config.vocab_size, s.latency_batch, s.max_length)
        return 1e3 * train.measure_latency(model, batch, repeats=s.latency_repeats)

    def float_row(self, row: Row, model, model_dir=None) -> Row:
        """Size (safetensors file, else float32 parameters), nonzero params, FLOPs, latency."""
        weights = _weights(model)
        cost = self.cost(model)
        row.params = int(sum(np.count_nonzero(w) for w in weights))
        row.size_mb = (_file_mb(model_dir) if model_dir else 4 * sum(w.size for w in weights) / 2 ** 20)
        row.flops, row.bops = cost["flops"], cost["bops"]
        return self.time(row, model)

    def pruned_row(self, row: Row, density: float) -> Row:
        """A one-shot pruned teacher the recipe measured but did not keep (`efficient_nlp.oneshot.prune`
        zeroes ``1 - density`` of every layer Linear's kernel and nothing else): stored and run
        dense, so size (the teacher's safetensors file), FLOPs and BOPs are the teacher's; nonzero
        params are the teacher's less the zeroed weights; latency is left empty (no model to time)."""
        from efficient_nlp.models import family as F
        kernels = sum(int(np.size(F.get_module(self.teacher, s.path).kernel.get_value()))
                      for s in F.sites(self.teacher))
        cost = self.cost(self.teacher)
        row.params = int(sum(np.count_nonzero(w) for w in _weights(self.teacher))) - round((1.0 - density) * kernels)
        row.size_mb = _file_mb(self.teacher_dir)
        row.flops, row.bops = cost["flops"], cost["bops"]
        return row

    def time(self, row: Row, model) -> Row:
        """The row's latency columns, measured on ``model`` (the model as deployed)."""
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
        return self.time(row, imodel)


def _weights(model) -> list[np.ndarray]:
    from efficient_nlp import models
    return [np.asarray(v.get_value()) for v in models.named_params(model).values()]


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


def missing_ptq_row(method: str) -> Row:
    """The row of a PTQ method the recipe in this checkout does not have."""
    return Row("", "", status="not available",
               note=f"recipe ptq has no method {method!r} in this checkout (efficient_nlp.recipes.ptq.METHODS)")


def _spec(config):
    """The `QuantSpec` a quantization recipe ran with (its ``config.quant``)."""
    from efficient_nlp import quant
    return quant.spec_from_config(config.quant.to_dict())


# ----------------------------------------------------------------------------- full precision
def teacher_config(settings: Settings, model_dir: str = ""):
    """configs/quickstart.py with the report's data, seed and ``finetune_steps``: the teacher's run."""
    config = _config("quickstart")
    config.model_dir = model_dir
    _data_overrides(config.data, settings)
    _train_overrides(config.train, settings, settings.finetune_steps)
    return config



# ----------------------------------------------------------------------------- QAT
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


# ----------------------------------------------------------------------------- PTQ
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
                rows.append(missing_ptq_row(m))
                continue
            row = Row("", "", metric=_metric(ctx, results["after"][m]), seconds=results["wall_seconds"][m],
                      note=f"{results['calibration']['size']} calibration rows; time: reconstruction only")
            rows.append(ctx.quantized_row(row, _spec(config), os.path.join(run_dir, m, "quantized")))
        return rows

    return Experiment(f"ptq_{name.replace('-', '_')}", tuple(f"PTQ {name} {_PTQ_TITLES[m]}" for m in PTQ_METHODS),
                      build, collect)


# ----------------------------------------------------------------------------- BinaryBERT
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


# ----------------------------------------------------------------------------- one-shot compression
#: The one-shot rows (docs/oneshot.md): a reduced table of configs/oneshot.py sized for 2 CPU
#: cores: each quantization method at each weight / activation setting, then each pruning
#: method at 2:4.  Both sections run it; the decoder's own settings are in decoder_rows.
ONESHOT_SETTINGS = ("w4g128", "w8a8")
ONESHOT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "gptq+mrem_s")
ONESHOT_PRUNE = ("sparsegpt", "wanda", "magnitude")
ONESHOT_SPARSITY = "2:4"
_ONESHOT_TITLES = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant",
                   "gptq+mrem_s": "GPTQ + MREM-S", "sparsegpt": "SparseGPT", "wanda": "Wanda",
                   "magnitude": "magnitude"}


def oneshot_table(settings: tuple) -> list[tuple[str, str, str]]:
    """``(table, setting or sparsity, method)`` of every one-shot row in table order, as the
    recipe's results hold them (``results[table][key][method]``): each of `ONESHOT_METHODS` at
    each setting of ``settings``, then each of `ONESHOT_PRUNE` at `ONESHOT_SPARSITY`."""
    return ([("quant", s, m) for s in settings for m in ONESHOT_METHODS]
            + [("prune", ONESHOT_SPARSITY, m) for m in ONESHOT_PRUNE])


def oneshot_titles(settings: tuple) -> tuple[str, ...]:
    """The titles of `oneshot_table`'s rows: ``GPTQ W4 g128 (one-shot)``, ``SmoothQuant W8A8
    (one-shot)``, ``pruning, SparseGPT 2:4 (one-shot)``."""
    def title(table, key, method):
        if table == "quant":
            return f"{_ONESHOT_TITLES[method]} {key.upper().replace('G', ' g')} (one-shot)"
        return f"pruning, {_ONESHOT_TITLES[method]} {key} (one-shot)"
    return tuple(title(*r) for r in oneshot_table(settings))


def oneshot_overrides(o, settings: tuple, calibration: int, mrem_steps: int, num_layers: int, seed: int):
    """``config.oneshot`` of a one-shot experiment: the table of `oneshot_table`, every packed
    artefact kept (the rows are measured from them), the calibration size and MREM-S steps per
    module (0: the config's own), at most ``num_layers`` MREM modules."""
    o.update(dict(settings=",".join(settings), methods=",".join(ONESHOT_METHODS), prune=",".join(ONESHOT_PRUNE),
                  sparsities=ONESHOT_SPARSITY, save_packed=True, seed=int(seed)))
    if calibration:
        o.calibration_size = int(calibration)
    if mrem_steps:
        o.mrem.steps = int(mrem_steps)
    o.mrem.num_modules = min(int(o.mrem.num_modules), num_layers)


def oneshot_collect(ctx, config, results: dict, run_dir: str, settings: tuple, make_row: Callable,
                    unit: str) -> list[Row]:
    """The rows of `oneshot_table` from the oneshot recipe's results: each quantized row measured
    from its packed artefact (`Context.quantized_row`), each pruned row from the teacher and the
    recipe's density (`Context.pruned_row`); compression s is the row's own time as the recipe
    took it.  ``make_row(metrics, **fields) -> Row`` reads the section's metric; ``unit`` names
    a calibration example ("rows", "blocks")."""
    from efficient_nlp.recipes.oneshot import packed_dir, parse_setting
    o = config.oneshot
    calib = f"{results['calibration']['size']} calibration {unit}"
    how = {"awq": "AWQ scales, then RTN", "smoothquant": f"SmoothQuant scales (alpha {o.smoothquant_alpha}), then RTN",
           "gptq+mrem_s": f"MREM-S {o.mrem.steps} steps per module from the GPTQ model; time: MREM-S only"}
    rows = []
    for table, key, method in oneshot_table(settings):
        r = results[table][key][method]
        if table == "quant":
            note = "; ".join([calib] + ([how[method]] if method in how else []) + ["embeddings and head in float"])
            row = make_row(r["metrics"], seconds=r["seconds"], note=note)
            spec = parse_setting(key).spec(str(o.activation_method))
            rows.append(ctx.quantized_row(row, spec, packed_dir(run_dir, key, method)))
        else:
            row = make_row(r["metrics"], seconds=r["seconds"],
                           note=f"{calib}; {key} in every layer Linear, stored and run dense; latency not "
                                "measured (the recipe keeps no pruned model)")
            rows.append(ctx.pruned_row(row, r["density"]))
    return rows


def _oneshot_build(ctx):
    s = ctx.settings
    config = _config("oneshot")
    config.teacher_dir = ctx.teacher_dir
    oneshot_overrides(config.oneshot, ONESHOT_SETTINGS, s.oneshot_calibration, s.oneshot_mrem_steps,
                      ctx.num_layers, s.seed)
    _data_overrides(config.data, s)
    _train_overrides(config.train, s)
    return config


def _oneshot_collect(ctx, config, results, run_dir, seconds):
    return oneshot_collect(ctx, config, results, run_dir, ONESHOT_SETTINGS,
                           lambda metrics, **fields: Row("", "", metric=_metric(ctx, metrics), **fields), "rows")


ONESHOT = Experiment("oneshot", oneshot_titles(ONESHOT_SETTINGS), _oneshot_build, _oneshot_collect)


# ----------------------------------------------------------------------------- pruning
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


# ----------------------------------------------------------------------------- cross distillation
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


# ----------------------------------------------------------------------------- distillation
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
    from efficient_nlp.report import dynamic_rows, lowrank_rows
    return [
        _qat((4, 4, 8)), _qat((2, 2, 8)), _qat((1, 1, 8)),
        _ptq((4, 4, 8)), _ptq((2, 2, 8)),
        BINARYBERT,
        ONESHOT,
        _prune_experiment("prune_magnitude_90", "pruning, magnitude 90% unstructured", "prune_magnitude", "0.9"),
        _prune_experiment("prune_movement_90", "pruning, movement 90% unstructured", "prune_movement", "0.9"),
        _prune_experiment("prune_structured_50", "pruning, 50% heads + FFN neurons, shrunk", "prune_structured", "0.5"),
        _cd("wo_cd"), _cd("cd"),
        DISTILL,
    ] + lowrank_rows.experiments() + dynamic_rows.experiments()


def row_keys(exp: Experiment) -> list[str]:
    """The keys of an experiment's rows: its own key, or ``<key>_<i>`` when it has several."""
    return [exp.key] if len(exp.methods) == 1 else [f"{exp.key}_{i}" for i in range(len(exp.methods))]


# ----------------------------------------------------------------------------- configs/
def ensure_configs_importable():
    """Puts the repository root (which holds ``configs/``) on ``sys.path``; fails clearly without it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(root, "configs")) and root not in sys.path:
        sys.path.insert(0, root)
    try:
        importlib.import_module("configs.quickstart")
    except ImportError as e:
        raise RuntimeError("the report runs the recipes from their configs/ files: run it from a checkout "
                           "of the repository (pip install -e .), not from a wheel") from e

