"""The report's decoder section: the pre-trained decoder compressed by the recipes' configs/lm_*.py.

Every row is a recipe run on its ``configs/lm_*.py`` file (``data.task = "lm"``: held-out
perplexity, exp of the mean next-token NLL, in place of accuracy) with the report's overrides
(step counts, data sizes, seed, the decoder's depth read from the model): full precision, QAT
4-4-8, PTQ 4-4-8 by REM and MREM-S, one-shot compression (RTN, GPTQ, AWQ, SmoothQuant and
GPTQ + MREM-S at W4 g64 and W8A8; SparseGPT, Wanda and magnitude pruning at 2:4), structured
pruning of half of the key/value head groups and FFN neurons (physically removed), unstructured
magnitude pruning to 50% and a half-depth student distilled from the decoder.  `DecoderContext`
is the `Context` of this section: the LM task, the decoder, and measurements per token.
"""
from __future__ import annotations

import json
import os

from efficient_nlp.report.rows import (Context, Experiment, Row, Settings, _config, _spec, _with_steps, missing_ptq_row,
                                       oneshot_collect, oneshot_overrides, oneshot_titles, row_keys)

#: Batch (blocks) of every held-out evaluation, as the configs/lm_*.py files set it.
LM_EVAL_BATCH = 16
#: PTQ methods of configs/lm_ptq_4_4_8.py, in table order.
LM_PTQ_METHODS = ("rem", "mrem_s")
_PTQ_TITLES = {"rem": "REM", "mrem_s": "MREM-S"}
#: Weight / activation settings of the one-shot rows: groups of 64, as configs/lm_oneshot.py (the
#: decoder's FFN width, 704, is not a multiple of 128).
LM_ONESHOT_SETTINGS = ("w4g64", "w8a8")
_LM_METRICS = ("perplexity", "nll", "token_accuracy")


def lm_data(settings: Settings):
    """``config.data`` of every decoder row: configs/_builders.lm_data_config with the settings'
    block size, training documents and held-out blocks (0: the config's own)."""
    from configs._builders import lm_data_config
    data = lm_data_config()
    _lm_data_overrides(data, settings)
    return data


def _lm_data_overrides(data, s: Settings):
    data.source = "builtin"
    for field, value in (("max_length", s.lm_block_size), ("max_documents", s.lm_max_documents),
                         ("eval_blocks", s.lm_eval_blocks)):
        if value:
            data[field] = int(value)


def _lm_train_overrides(train, s: Settings, num_steps=None):
    """Fixed seed, the settings' batch and no intermediate evaluation / checkpoints (timed runs)."""
    train.update(dict(seed=s.seed, eval_batch_size=LM_EVAL_BATCH, eval_every=0, checkpoint_every=0,
                      tensorboard=False, progress_bar=False))
    if s.lm_batch_size:
        train.batch_size = int(s.lm_batch_size)
    if num_steps:
        train.num_steps = int(num_steps)


def lm_metrics_of(results: dict) -> dict:
    """The causal-LM metrics of a recipe's evaluation dict (its fidelity keys left out)."""
    return {k: float(results[k]) for k in _LM_METRICS if k in results}


def _row(results: dict, **fields) -> Row:
    metrics = lm_metrics_of(results)
    return Row("", "", metric=metrics["perplexity"], metrics=metrics, **fields)


def _steps(config) -> str:
    return "+".join(str(stage["num_steps"]) for stage in config.distill.stages)


# ----------------------------------------------------------------------------- context
class DecoderContext(Context):
    """The decoder, its held-out blocks and the per-token measurements of the decoder section.

    Cost columns are per token (a block's FLOPs / BOPs over its length); ``latency_ms`` is the
    prefill cost per token (one jitted forward pass of 1 x block tokens, divided by the block)
    and ``decode_ms`` the greedy decoding time per generated token, batch 1
    (`efficient_nlp.models.generate.decode_speed`)."""

    section = "decoder"
    higher_is_better = False           # perplexity

    def __init__(self, settings: Settings, decoder_dir: str, workdir: str):
        from efficient_nlp import data as data_lib
        from efficient_nlp import models

        self.settings, self.teacher_dir, self.workdir = settings, decoder_dir, workdir
        d = lm_data(settings)
        self.block_size = int(d.max_length)
        self.task = data_lib.load_lm_task(decoder_dir, source=d.source, validation=d.validation,
                                          block_size=self.block_size, max_documents=d.max_documents,
                                          eval_blocks=d.eval_blocks)
        self.num_labels = None
        self.teacher = models.from_pretrained(decoder_dir)
        if not isinstance(self.teacher, models.DecoderForCausalLM):
            raise ValueError(f"{decoder_dir} holds a {type(self.teacher).__name__}, not a decoder: the decoder "
                             "section needs a causal LM (e.g. the one configs/pretrain_causal_lm.py writes)")
        self.num_layers = self.teacher.config.num_hidden_layers
        self.sample = {k: v[:1] for k, v in self.task.dev.items()}
        self.metric_name = "perplexity"

    def load(self, model_dir):
        from efficient_nlp import models
        return models.from_pretrained(model_dir)

    def cost(self, model, spec=None) -> dict:
        """`Context.cost` with FLOPs and BOPs per token."""
        cost = dict(super().cost(model, spec))
        cost["flops"], cost["bops"] = cost["flops"] / self.block_size, cost["bops"] / self.block_size
        return cost

    def latency_ms(self, model) -> float:
        from efficient_nlp import train
        batch = train.token_batch(model.config.vocab_size, 1, self.block_size)
        return 1e3 * train.measure_latency(model, batch, repeats=self.settings.latency_repeats) / self.block_size

    def decode_ms(self, model) -> float:
        from efficient_nlp.models.generate import decode_speed
        s = self.settings
        speed = decode_speed(model, batch=1, prompt_len=s.lm_prompt_len, new_tokens=s.lm_decode_tokens,
                             repeats=s.latency_repeats, seed=s.seed)
        return 1e3 / speed["decode_tokens_per_s"]

    def time(self, row: Row, model) -> Row:
        row.latency_ms = self.latency_ms(model)
        if self.settings.lm_decode_tokens:
            row.decode_ms = self.decode_ms(model)
        return row


def decoder_fp_row(ctx: DecoderContext) -> Row:
    """The decoder's own row: held-out metrics (also written to ``workdir/lm_fp/results.json``)
    and its measurements."""
    from efficient_nlp import data as data_lib
    from efficient_nlp import train as train_lib
    spec = ctx.task.spec
    eval_fn = train_lib.make_eval_fn(ctx.task.dev, LM_EVAL_BATCH,
                                     lambda p, y, w: data_lib.compute_metrics(spec, p, y, w))
    run_dir = os.path.join(ctx.workdir, "lm_fp")
    dev = eval_fn(ctx.teacher)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"task": spec.name, "decoder_dir": ctx.teacher_dir, "dev": dev}, f, indent=2)
    row = _row(dev, status="ok", run_dir=run_dir, note=f"pre-trained decoder {ctx.teacher_dir}")
    row.key, row.method, row.section = "lm_fp", "full precision (pre-trained decoder)", "decoder"
    return ctx.float_row(row, ctx.teacher, ctx.teacher_dir)


# ----------------------------------------------------------------------------- QAT
def _qat_build(ctx):
    from configs._builders import layerwise_matches
    s = ctx.settings
    config = _config("lm_qat_4_4_8")
    config.model_dir = config.teacher_dir = ctx.teacher_dir
    _lm_data_overrides(config.data, s)
    _lm_train_overrides(config.train, s)
    stages = list(config.distill.stages)
    stages[0] = dict(stages[0], matches=layerwise_matches(ctx.num_layers, [("hidden", "hidden_mse")]))
    config.distill.stages = _with_steps(stages, s.lm_qat_steps) if s.lm_qat_steps else stages
    return config


def _qat_collect(ctx, config, results, run_dir, seconds):
    row = _row(results["student"], seconds=seconds, note=f"{_steps(config)} distillation steps")
    return [ctx.quantized_row(row, _spec(config), os.path.join(run_dir, "quantized"))]


# ----------------------------------------------------------------------------- PTQ
def _ptq_available(ctx):
    import importlib
    recipe = importlib.import_module("efficient_nlp.recipes.ptq")
    missing = [m for m in LM_PTQ_METHODS if m not in recipe.METHODS]
    return f"recipe ptq has no method(s) {missing} in this checkout" if len(missing) == len(LM_PTQ_METHODS) else None


def _ptq_build(ctx):
    import importlib
    s = ctx.settings
    known = importlib.import_module("efficient_nlp.recipes.ptq").METHODS
    config = _config("lm_ptq_4_4_8")
    config.model_dir = config.teacher_dir = ctx.teacher_dir
    config.ptq.method = ",".join(m for m in LM_PTQ_METHODS if m in known)
    config.ptq.seed = s.seed
    if s.lm_ptq_calibration:
        config.ptq.calibration_size = int(s.lm_ptq_calibration)
    if s.lm_rem_steps:
        config.ptq.rem.steps = int(s.lm_rem_steps)
    if s.lm_mrem_steps:
        config.ptq.mrem.steps = int(s.lm_mrem_steps)
    config.ptq.mrem.num_modules = min(int(config.ptq.mrem.num_modules), ctx.num_layers)
    _lm_data_overrides(config.data, s)
    _lm_train_overrides(config.train, s)
    return config


def _ptq_collect(ctx, config, results, run_dir, seconds):
    rows = []
    for m in LM_PTQ_METHODS:
        if m not in results["after"]:
            rows.append(missing_ptq_row(m))
            continue
        row = _row(results["after"][m], seconds=results["wall_seconds"][m],
                   note=f"{results['calibration']['size']} calibration blocks; time: reconstruction only")
        rows.append(ctx.quantized_row(row, _spec(config), os.path.join(run_dir, m, "quantized")))
    return rows


# ----------------------------------------------------------------------------- one-shot
def _oneshot_build(ctx):
    s = ctx.settings
    config = _config("lm_oneshot")
    config.model_dir = config.teacher_dir = ctx.teacher_dir
    oneshot_overrides(config.oneshot, LM_ONESHOT_SETTINGS, s.lm_oneshot_calibration, s.lm_oneshot_mrem_steps,
                      ctx.num_layers, s.seed)
    _lm_data_overrides(config.data, s)
    _lm_train_overrides(config.train, s)
    return config


def _oneshot_collect(ctx, config, results, run_dir, seconds):
    return oneshot_collect(ctx, config, results, run_dir, LM_ONESHOT_SETTINGS, _row, "blocks")


# ----------------------------------------------------------------------------- pruning
def _prune_build(module):
    def build(ctx):
        s = ctx.settings
        config = _config(module)
        config.model_dir = ctx.teacher_dir        # prune the decoder while training on its LM loss
        _lm_data_overrides(config.data, s)
        _lm_train_overrides(config.train, s, s.lm_prune_steps)
        n = int(config.train.num_steps)
        config.prune.schedule = dict(kind="gradual_cubic", begin_step=int(config.train.warmup_ratio * n),
                                     end_step=int(0.6 * n), frequency=max(1, n // 30))
        config.prune.measure_latency = False      # the report measures every row the same way
        return config
    return build


def _prune_collect(ctx, config, results, run_dir, seconds):
    note = f"{config.train.num_steps} steps from the decoder"
    if "shrink" in results:
        row = _row(results["shrink"]["dev_shrunk"], seconds=seconds,
                   note=note + "; key/value head groups (with their query heads) and FFN neurons removed")
        path = os.path.join(run_dir, "model_shrunk")
    else:
        row = _row(results["dev_after"], seconds=seconds,
                   note=note + f"; {results['sparsity_total']:.0%} of the layers' weights zero, stored and run dense")
        path = os.path.join(run_dir, "model")
    return [ctx.float_row(row, ctx.load(path), path)]


# ----------------------------------------------------------------------------- distillation
def _distill_build(ctx):
    """A student of every other decoder layer (0, 2, ...), copied from the decoder: hidden states
    on the uniform map, then per-token KL on the logits (configs/lm_distill.py)."""
    from efficient_nlp.distill import layer_matches, uniform_hidden_map
    s = ctx.settings
    if ctx.num_layers < 2:
        raise ValueError(f"a half-depth student needs a decoder of >= 2 layers, got {ctx.num_layers}")
    config = _config("lm_distill")
    config.model_dir = config.teacher_dir = ctx.teacher_dir
    _lm_data_overrides(config.data, s)
    _lm_train_overrides(config.train, s)
    config.student.layers = tuple(range(0, ctx.num_layers, 2))
    stages = list(config.distill.stages)
    hidden = uniform_hidden_map(ctx.num_layers, len(config.student.layers))
    stages[0] = dict(stages[0], matches=layer_matches("hidden", "hidden_mse", hidden))
    config.distill.stages = _with_steps(stages, s.lm_distill_steps) if s.lm_distill_steps else stages
    return config


def _distill_collect(ctx, config, results, run_dir, seconds):
    path = os.path.join(run_dir, "student")
    row = _row(results["student"], seconds=seconds,
               note=f"decoder layers {results['student_layers']}, {_steps(config)} steps")
    return [ctx.float_row(row, ctx.load(path), path)]


# ----------------------------------------------------------------------------- the list
def decoder_experiments() -> list[Experiment]:
    """Every experiment of the decoder section, in table order (after the ``lm_fp`` row)."""
    return [
        Experiment("lm_qat_4_4_8", ("QAT 4-4-8 (two-stage KD: hidden states, then logits KL)",),
                   _qat_build, _qat_collect),
        Experiment("lm_ptq_4_4_8", tuple(f"PTQ 4-4-8 {_PTQ_TITLES[m]}" for m in LM_PTQ_METHODS),
                   _ptq_build, _ptq_collect, _ptq_available),
        Experiment("lm_oneshot", oneshot_titles(LM_ONESHOT_SETTINGS), _oneshot_build, _oneshot_collect),
        Experiment("lm_prune_structured_50", ("pruning, 50% key/value head groups + FFN neurons, shrunk",),
                   _prune_build("lm_prune_structured"), _prune_collect),
        Experiment("lm_prune_magnitude_50", ("pruning, magnitude 50% unstructured",),
                   _prune_build("lm_prune_magnitude"), _prune_collect),
        Experiment("lm_distill_half", ("distilled half-depth student (two-stage KD)",),
                   _distill_build, _distill_collect),
    ]


def decoder_row_keys() -> list[str]:
    """Every decoder row key in table order, ``lm_fp`` first."""
    return ["lm_fp"] + [k for e in decoder_experiments() for k in row_keys(e)]
