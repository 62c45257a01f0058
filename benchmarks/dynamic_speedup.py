"""Measured against predicted speed-up of the dynamic methods at their operating points.

    python benchmarks/dynamic_speedup.py --early_exit runs/early_exit --token_skip runs/token_skip
                                         [--examples 128] [--batch 32] [--rounds 5] [--max_length 64]

Reads the workdirs of the ``early_exit`` and ``token_skip`` recipes (either may be left out): the
saved model and the operating points of ``results.json`` nearest 1.5x and 2x batch-1 speed-up.
For each point the runner that really stops / removes tokens and the full jitted model run the
same dev examples of the built-in task, trimmed to the length bucket of their longest row,
alternating, median of ``--rounds`` (`efficient_nlp.dynamic.sweep.time_side_by_side`), at batch 1
and at ``--batch``.  Printed next to the measured speed-ups: the one the work predicts (early exit:
layers / mean layers run; token skipping: 1 / fraction of token-layers computed), which counts
neither the exit heads and host decisions nor the gathers.
"""
import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from efficient_nlp import data as data_lib  # noqa: E402
from efficient_nlp.dynamic import EarlyExitRunner, TokenSkipRunner, exit_rules, exits, sweep, tokens  # noqa: E402
from efficient_nlp.models import family as F  # noqa: E402


def log(msg, start=[time.perf_counter()]):  # noqa: B006 - the start time of the run
    print(f"[{time.perf_counter() - start[0]:6.1f}s] {msg}", flush=True)


def early_exit_rows(workdir, args):
    results = json.load(open(os.path.join(workdir, "results.json")))
    model, _ = exits.load(os.path.join(workdir, "model"))
    layers = F.num_layers(model)
    temperatures = tuple(results["temperatures"])
    rows = []
    for name, r in results["rules"].items():
        for target, p in r["operating_points"].items():
            value = p["threshold"]
            rule = {"entropy": lambda: exit_rules.Entropy(value),
                    "confidence": lambda: exit_rules.Confidence(value, temperatures),
                    "patience": lambda: exit_rules.Patience(int(value))}[name]()
            rows.append((f"early exit {p['rule']}", target, p["accuracy"], layers / p["mean_layers"],
                         lambda rule=rule: EarlyExitRunner(model, rule, max_batch=args.batch)))
    return model, rows


def token_skip_rows(workdir, args):
    results = json.load(open(os.path.join(workdir, "results.json")))
    model = tokens.load(os.path.join(workdir, "model"))
    method = results["method"]
    rows = []
    for target, p in results["operating_points"].items():
        scaled = (tokens.set_counts(model, tuple(p["setting"])) if method == "power"
                  else tokens.set_thresholds(model, tuple(p["setting"])))
        rows.append((f"token skip {method} x{p['scale']:g}", target, p["accuracy"], 1.0 / p["work"],
                     lambda m=scaled: TokenSkipRunner(m)))
    return model, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--early_exit", default="")
    ap.add_argument("--token_skip", default="")
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max_length", type=int, default=64)
    args = ap.parse_args()
    if not (args.early_exit or args.token_skip):
        ap.error("give --early_exit and / or --token_skip (workdirs of the recipes)")
    log(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs")
    table = []
    for workdir, rows_fn in ((args.early_exit, early_exit_rows), (args.token_skip, token_skip_rows)):
        if not workdir:
            continue
        model, rows = rows_fn(workdir, args)
        task = data_lib.load_task_data("builtin", tokenizer_dir=os.path.join(workdir, "model"),
                                       max_length=args.max_length)
        b1 = sweep.timing_batches(task.dev, args.examples, 1)
        batched = sweep.timing_batches(task.dev, args.examples, args.batch)
        full = sweep.full_model_fn(model)
        for name, target, accuracy, predicted, make in rows:
            runner = make()
            t = sweep.measured_speedups(full, runner, b1, batched, rounds=args.rounds)
            table.append((name, target, accuracy, predicted, t))
            log(f"{name}: predicted {predicted:.2f}x, measured batch 1 {t['speedup_b1']:.2f}x, "
                f"batch {args.batch} {t['speedup_batched']:.2f}x")
    print(f"\n{args.examples} dev examples, {args.rounds} rounds; ms per example (full / dynamic)")
    print(f"{'method':<34}{'point':>6}{'accuracy':>9}{'predicted':>10}{'b1 ms':>15}{'x b1':>7}"
          f"{f'b{args.batch} ms':>15}{f'x b{args.batch}':>7}")
    for name, target, accuracy, predicted, t in table:
        print(f"{name:<34}{target:>6}{accuracy:>9.4f}{predicted:>9.2f}x"
              f"{t['full_ms_b1']:>7.2f}/{t['dynamic_ms_b1']:<7.2f}{t['speedup_b1']:>6.2f}x"
              f"{t['full_ms_batched']:>7.2f}/{t['dynamic_ms_batched']:<7.2f}{t['speedup_batched']:>6.2f}x")


if __name__ == "__main__":
    main()
