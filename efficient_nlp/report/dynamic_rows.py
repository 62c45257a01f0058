"""The report's rows for dynamic inference: early exit (calibrated confidence) and token skipping (LTP), each
at the operating points of its sweep nearest 1.5x and 2x measured batch-1 speed-up
(configs/early_exit.py and configs/token_skip.py run with the report's data and step counts).

Size and parameters are the model as saved (the exits or thresholds included); FLOPs are the
full model's scaled by the fraction of layers (token-layers) the operating point runs on the dev
set.  The speed of a dynamic model depends on its inputs, so random tokens (the table's latency
batch) cannot time it: its latency is the full model's, timed as every other row, divided by the
batched speed-up the recipe measured on real dev examples (runner against full model, side by
side); the note gives that speed-up and the batch-1 one.
"""
from __future__ import annotations

import os

from efficient_nlp.report.rows import Experiment, Row, _config, _data_overrides, _train_overrides

TARGETS = ("1.5x", "2x")


def _note(p, work: str) -> str:
    return (f"{work}; measured speed-up over the full model {p['speedup_b1']:.2f}x at batch 1, "
            f"{p['speedup_batched']:.2f}x batched (latency: the full model's / the batched speed-up)")


def _row(ctx, model, path, p, fraction, note) -> Row:
    row = Row("", "", metric=p["accuracy"], note=note)
    ctx.float_row(row, model, None)
    row.size_mb = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                      if f.endswith(".safetensors")) / 2 ** 20
    row.flops = row.bops = None if row.flops is None else row.flops * fraction
    row.latency_ms = ctx.latency_ms(ctx.teacher) / p["speedup_batched"]
    return row


# ----------------------------------------------------------------------------- early exit
def _exit_build(ctx):
    s = ctx.settings
    config = _config("early_exit")
    config.teacher_dir = ctx.teacher_dir
    config.early_exit.rules = "confidence"
    _data_overrides(config.data, s)
    _train_overrides(config.train, s, s.early_exit_steps)
    return config


def _exit_collect(ctx, config, results, run_dir, seconds):
    from efficient_nlp.dynamic import exits
    path = os.path.join(run_dir, "model")
    model, _ = exits.load(path)
    points = results["rules"]["confidence"]["operating_points"]
    rows = []
    for target in TARGETS:
        p = points[target]
        rows.append(_row(ctx, model, path, p, p["mean_layers"] / ctx.num_layers,
                         _note(p, f"{p['rule']}, mean layers {p['mean_layers']:.2f} of {ctx.num_layers}, "
                                  f"exits trained {config.train.num_steps} steps")))
        rows[-1].seconds = seconds
    return rows


EARLY_EXIT = Experiment("early_exit", tuple(f"early exit, calibrated confidence (nearest {t} batch-1 speed-up)"
                                            for t in TARGETS),
                        _exit_build, _exit_collect)


# ----------------------------------------------------------------------------- token skipping
def _skip_build(ctx):
    s = ctx.settings
    config = _config("token_skip")
    config.teacher_dir = ctx.teacher_dir
    config.token_skip.soft_steps, config.token_skip.hard_steps = s.token_skip_steps
    _data_overrides(config.data, s)
    _train_overrides(config.train, s)
    return config


def _skip_collect(ctx, config, results, run_dir, seconds):
    from efficient_nlp.dynamic import tokens
    path = os.path.join(run_dir, "model")
    model = tokens.load(path)
    steps = f"{config.token_skip.soft_steps}+{config.token_skip.hard_steps} steps (soft, hard)"
    rows = []
    for target in TARGETS:
        p = results["operating_points"][target]
        rows.append(_row(ctx, model, path, p, p["work"],
                         _note(p, f"thresholds x{p['scale']:g}, {p['work']:.0%} of token-layers computed, {steps}")))
        rows[-1].seconds = seconds
    return rows


TOKEN_SKIP = Experiment("token_skip", tuple(f"token skipping, LTP (nearest {t} batch-1 speed-up)" for t in TARGETS),
                        _skip_build, _skip_collect)


def experiments() -> list[Experiment]:
    """This file's experiments, in table order."""
    return [EARLY_EXIT, TOKEN_SKIP]
