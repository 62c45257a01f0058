"""Early exit: internal classifiers on a fine-tuned teacher, swept by exit rule and measured by the
clock (docs/dynamic.md).

    python train.py --config configs/early_exit.py --workdir runs/early_exit

1. Teacher: the fine-tuned model (``config.teacher_dir``; empty = fine-tune ``config.model_dir`` on
   ``config.data`` first, as the other compression recipes do).
2. Exits: an off-ramp (``pooling``: the first token or the mean of the real tokens -> dense ->
   tanh -> classifier, DeeBERT) after each layer count of ``config.early_exit.layers`` ("" =
   every layer); the last exit is the model's own head.
3. Training (``config.train.num_steps``): ``two_stage`` trains the exits only on the frozen
   fine-tuned backbone (the full model's predictions stay exactly the teacher's); ``joint`` trains
   everything.  The loss is the weighted mean of the exits' cross-entropies (``weights``: ``pabee``
   weights exit k by k) plus ``distill_weight`` times the KL from the final exit's softmax into
   every other exit (FastBERT).
4. Sweep: for each rule of ``config.early_exit.rules`` and each of its ``thresholds``: dev accuracy
   and mean layers run (one offline pass of every exit over the dev set), and the measured seconds
   per example of the runner that really stops (batch 1: the remaining layers never run; batched:
   exited rows leave the batch) against the full jitted model on the same trimmed inputs,
   alternating, median of ``rounds``.  Confidence thresholds use per-exit temperatures fitted on
   the dev set.
5. Output: ``results.json`` (every point, the operating points nearest 1.5x and 2x measured
   batch-1 speed-up and the fastest within one point of the full model's accuracy),
   ``sweep_<rule>.png`` and the model with its exits and the rule of the first rule's fastest point
   within one point (else its 1.5x point) in ``workdir/model`` (`efficient_nlp.dynamic.exits.load`).
"""
from __future__ import annotations

import os

import numpy as np
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import train as train_lib
from efficient_nlp.dynamic import exit_rules, exits, sweep
from efficient_nlp.dynamic.exit_runner import EarlyExitRunner
from efficient_nlp.recipes.common import teacher_and_task
from efficient_nlp.recipes.outputs import save_outputs

RULES = ("entropy", "confidence", "patience")
TRAINING = ("two_stage", "joint")


def _numbers(text, cast=float) -> list:
    return [cast(v) for v in str(text).split(",") if v.strip()]


def check_config(config) -> dict:
    """Config-time validation; returns ``{rule name: [rule objects of the sweep]}``."""
    c = config.early_exit
    if c.pooling not in exits.POOLINGS:
        raise ValueError(f"config.early_exit.pooling={c.pooling!r}; use one of {exits.POOLINGS}")
    if c.training not in TRAINING:
        raise ValueError(f"config.early_exit.training={c.training!r}; use one of {TRAINING}")
    names = [r.strip() for r in str(c.rules).split(",") if r.strip()]
    unknown = sorted(set(names) - set(RULES))
    if unknown or not names:
        raise ValueError(f"config.early_exit.rules={c.rules!r}: unknown rule(s) {unknown or 'none given'}; "
                         f"rules are {', '.join(RULES)}")
    sweeps = {}
    for name in names:
        text = c.thresholds.get(name, "")
        values = _numbers(text, int if name == "patience" else float)
        if not values:
            raise ValueError(f"config.early_exit.thresholds.{name} is empty; give comma-separated values")
        sweeps[name] = [_rule(name, v) for v in values]
    _numbers(c.layers, int)
    return sweeps


def _rule(name, value, temperatures=None):
    if name == "entropy":
        return exit_rules.Entropy(value)
    if name == "confidence":
        return exit_rules.Confidence(value, temperatures)
    return exit_rules.Patience(value)


def _all_exit_logits(model, batch):
    """[B, E, C]: every exit's logits, rows first (for `train.predict`)."""
    return exits.exit_logits(model, batch).transpose(1, 0, 2)


def train_exits(model, task, config, workdir):
    """Trains the exits (two-stage: only them; joint: everything); returns the trained model."""
    c = config.early_exit

    def batches(start):
        return data_lib.train_batches(task.train, config.train.batch_size, seed=config.train.seed, start_step=start)

    loss_fn = exits.make_loss(weights=c.weights, final_teacher=float(c.distill_weight) > 0,
                              distill_weight=float(c.distill_weight),
                              temperature=float(c.temperature))
    trainable = exits.EXITS if c.training == "two_stage" else nnx.Param
    model, _ = train_lib.fit(model, loss_fn, batches, config=config, workdir=os.path.join(workdir, "train"),
                             trainable=trainable)
    return model


def run(config, workdir):
    """Adds, trains, sweeps and measures the exits; returns the results dict."""
    train_lib.init_distributed(config)
    sweeps = check_config(config)
    c = config.early_exit
    teacher_dir, task, teacher, _, _ = teacher_and_task(config, workdir)
    model = exits.add_exits(teacher, _numbers(c.layers, int) or None, seed=config.train.seed, pooling=c.pooling)
    model = train_exits(model, task, config, workdir)
    labels = np.asarray(task.dev["labels"])
    logits = train_lib.predict(model, task.dev, config.train.eval_batch_size, predict_fn=_all_exit_logits)
    logits = np.transpose(logits, (1, 0, 2))  # [E, N, C]
    layers = tuple(model.exit_layers)

    def accuracy(lg):  # the task's main metric (accuracy for the built-in task; MCC, F1 ... for others)
        return data_lib.compute_metrics(task.spec, lg, labels)[task.spec.metrics[0]]

    temperatures = tuple(exit_rules.fit_temperature(lg, labels) for lg in logits)
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "training": c.training,
               "exit_layers": list(layers), "temperatures": list(temperatures),
               "full_accuracy": accuracy(logits[-1]),
               "teacher_accuracy": accuracy(train_lib.predict(teacher, task.dev, config.train.eval_batch_size)),
               "exit_accuracy": {str(k): accuracy(lg) for k, lg in zip(layers, logits)}, "rules": {}}
    b1 = sweep.timing_batches(task.dev, c.timing_examples, 1)
    batched = sweep.timing_batches(task.dev, c.timing_examples, c.timing_batch)
    full = sweep.full_model_fn(model)
    for name, rules in sweeps.items():
        points = []
        for rule in rules:
            if name == "confidence":
                rule = _rule(name, rule.threshold, temperatures)
            points.append(_point(model, name, rule, logits, layers, accuracy, full, b1, batched, c))
            print(f"[{name}] {_describe(points[-1])}")
        results["rules"][name] = {"points": points, "operating_points": sweep.operating_points(
            points, full_accuracy=results["full_accuracy"])}
        if train_lib.is_main_process():
            os.makedirs(workdir, exist_ok=True)
            sweep.plot_sweep(points, os.path.join(workdir, f"sweep_{name}.png"), work="mean layers run",
                             work_key="mean_layers", full_accuracy=results["full_accuracy"],
                             title=f"early exit ({name}), {task.spec.name}: {len(layers)} exits")
    first = next(iter(sweeps))
    chosen = saved_point(results["rules"][first]["operating_points"])
    results["saved_rule"] = chosen["rule"]
    out = os.path.join(workdir, "model")
    if train_lib.is_main_process():
        exits.save(model, out, rule=_rule(first, chosen["threshold"], temperatures if first == "confidence" else None))
        task.tokenizer.save_pretrained(out)
    save_outputs(workdir, results, task.tokenizer, {})
    print(format_results(results))
    print(f"Model with exits: {out} (efficient_nlp.dynamic.exits.load); sweep plots: "
          f"{os.path.join(workdir, 'sweep_<rule>.png')}; results: {os.path.join(workdir, 'results.json')}")
    return results


def saved_point(operating_points) -> dict:
    """The point whose rule is saved with the model: the fastest within one point of the full
    model's accuracy, else the one nearest 1.5x."""
    return operating_points.get("within 0.01", operating_points["1.5x"])


def _point(model, name, rule, logits, layers, accuracy, full, b1, batched, c) -> dict:
    """One sweep point: offline accuracy / layers, and measured speed-ups of the runner."""
    decision = exit_rules.simulate(logits, rule, layers)
    runner = EarlyExitRunner(model, rule, max_batch=int(c.timing_batch))
    value = rule.patience if name == "patience" else rule.threshold
    return {"rule": f"{name} {value:g}", "threshold": value,
            "accuracy": accuracy(decision.logits), "mean_layers": float(np.mean(decision.layers_run)),
            "exits": {str(k): int(np.sum(decision.layers_run == k)) for k in layers},
            **sweep.measured_speedups(full, runner, b1, batched, rounds=int(c.rounds))}


def _describe(p) -> str:
    return (f"{p['rule']}: accuracy {p['accuracy']:.4f}, mean layers {p['mean_layers']:.2f}, "
            f"speed-up batch 1 {p['speedup_b1']:.2f}x, batched {p['speedup_batched']:.2f}x")


def format_results(results) -> str:
    """Per rule: the operating points nearest 1.5x and 2x measured batch-1 speed-up."""
    lines = [f"Task {results['task']}: early exit ({results['training']}), exits after layers "
             f"{results['exit_layers']}; full model accuracy {results['full_accuracy']:.4f} "
             f"(teacher {results['teacher_accuracy']:.4f})",
             "exit accuracy: " + ", ".join(f"L{k} {v:.4f}" for k, v in results["exit_accuracy"].items()),
             f"{'rule':<22}{'point':>12}{'accuracy':>10}{'layers':>8}{'b1 ms':>8}{'x b1':>7}{'x batched':>10}"]
    for name, r in results["rules"].items():
        for target, p in r["operating_points"].items():
            lines.append(f"{p['rule']:<22}{target:>12}{p['accuracy']:>10.4f}{p['mean_layers']:>8.2f}"
                         f"{p['dynamic_ms_b1']:>8.2f}{p['speedup_b1']:>7.2f}{p['speedup_batched']:>10.2f}")
    return "\n".join(lines)
