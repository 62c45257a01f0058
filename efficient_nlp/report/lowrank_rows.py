"""The report's rows for low rank, weight sharing and parameter-efficient fine-tuning: SVD at two
ranks recovered by distillation, cross-layer sharing, LoRA and QLoRA fine-tuning (configs/lowrank.py,
configs/sharing.py, configs/peft.py run with the report's data and step counts)."""
from __future__ import annotations

import os

from efficient_nlp.report.rows import Experiment, Row, _config, _data_overrides, _metric, _train_overrides

#: The two SVD rows: every layer Linear at these ranks (MiniLM's d = 384, FFN 1536).
LOWRANK_SETTINGS = ("r128", "r64")
#: The PEFT rows, fine-tuned from the pretrained model the teacher was fine-tuned from
#: (`Settings.model_dir`), not from the teacher.
PEFT_METHODS = ("lora", "qlora")
_PEFT_TITLES = {"lora": "LoRA fine-tuning (r 8, q v)", "qlora": "QLoRA fine-tuning (NF4 base, r 8, q v)"}


# ----------------------------------------------------------------------------- SVD
def _recovery_config(ctx, module: str, steps):
    """configs/<module>.py on the report's teacher, data and training settings, its recovery stages
    (every layer's hidden states and attention scores, then the logits) resized to the teacher's
    layers and run ``steps`` each, at the config's learning rates."""
    from configs import sharing
    s = ctx.settings
    config = _config(module)
    config.teacher_dir = ctx.teacher_dir
    _data_overrides(config.data, s)
    _train_overrides(config.train, s)
    lrs = tuple(stage["learning_rate"] for stage in config.distill.stages)
    config.distill.stages = sharing.recovery_stages(ctx.num_layers, steps=tuple(steps), learning_rates=lrs)
    return config


def _lowrank_build(ctx):
    config = _recovery_config(ctx, "lowrank", ctx.settings.lowrank_steps)
    config.lowrank.settings = ",".join(LOWRANK_SETTINGS)
    return config


def _lowrank_collect(ctx, config, results, run_dir, seconds):
    from efficient_nlp import lowrank
    steps = "+".join(str(n) for n in ctx.settings.lowrank_steps)
    rows = []
    for name in LOWRANK_SETTINGS:
        r = results["settings"][name]
        path = os.path.join(run_dir, name, "student")
        row = Row("", "", metric=_metric(ctx, r["student"]), seconds=r["seconds"],
                  note=f"{r['factorized']} Linears factorised ({r['params_ratio']:.2f}x params), "
                       f"{steps} distillation steps")
        rows.append(ctx.float_row(row, lowrank.load(path, num_labels=ctx.num_labels), path))
    return rows


LOWRANK = Experiment("lowrank_svd", tuple(f"low rank, SVD rank {n[1:]} + KD" for n in LOWRANK_SETTINGS),
                     _lowrank_build, _lowrank_collect)


# ----------------------------------------------------------------------------- sharing
def _sharing_build(ctx):
    config = _recovery_config(ctx, "sharing", ctx.settings.sharing_steps)
    config.sharing.num_unique = max(1, ctx.num_layers // 2)
    return config


def _sharing_collect(ctx, config, results, run_dir, seconds):
    from efficient_nlp import sharing
    path = os.path.join(run_dir, "student")
    model = sharing.load(path, num_labels=ctx.num_labels)
    row = Row("", "", metric=_metric(ctx, results["student"]), seconds=seconds,
              note=f"layers {results['assignment']} ({results['mode']}), "
                   f"{'+'.join(str(n) for n in ctx.settings.sharing_steps)} distillation steps; params and size "
                   "count unique layers")
    ctx.float_row(row, model, None)
    row.params = results["size"]["student_unique_params"]
    row.size_mb = results["size"]["student_mb"]
    return [row]


SHARING = Experiment("sharing", ("layer sharing, half the layers (cycle-rev) + KD",), _sharing_build,
                     _sharing_collect)


# ----------------------------------------------------------------------------- PEFT
def _peft_build(ctx):
    s = ctx.settings
    config = _config("peft")
    config.model_dir = s.model_dir
    config.peft.methods = ",".join(PEFT_METHODS)
    _data_overrides(config.data, s)
    _train_overrides(config.train, s, s.peft_steps)
    return config


def _peft_collect(ctx, config, results, run_dir, seconds):
    rows = []
    for method in PEFT_METHODS:
        r = results["methods"][method]
        mem = r["memory"]
        rows.append(Row("", "", metric=_metric(ctx, r["dev_after"]), params=r["trainable_params"],
                        seconds=r["train_seconds"], size_mb=r["stored_bytes"] / 2 ** 20,
                        note=f"from the pretrained model, {results['steps']} steps; params: trainable "
                             f"({r['trainable_fraction']:.2%}); size: the saved adapter; planned step memory "
                             f"{mem['peak_bytes'] / 2 ** 20:.0f} MB (optimizer {mem['optimizer_bytes'] / 2 ** 20:.1f} MB, "
                             f"frozen base {mem['frozen_bytes'] / 2 ** 20:.1f} MB); latency not measured"))
    return rows


PEFT = Experiment("peft", tuple(_PEFT_TITLES[m] for m in PEFT_METHODS), _peft_build, _peft_collect)


def experiments() -> list[Experiment]:
    """This file's experiments, in table order."""
    return [LOWRANK, SHARING, PEFT]
