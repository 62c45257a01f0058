"""Token skipping (PoWER-BERT, LTP) on a fine-tuned teacher, swept and measured by the clock
(docs/dynamic.md).

    python train.py --config configs/token_skip.py --workdir runs/token_skip              # LTP
    python train.py --config configs/token_skip_power.py --workdir runs/token_skip_power  # PoWER-BERT

1. Teacher: the fine-tuned model (``config.teacher_dir``; empty = fine-tune ``config.model_dir`` on
   ``config.data`` first, as the other compression recipes do).
2. Soft stage (``soft_steps``; the model at ``soft_learning_rate``, the retention parameters at
   ``skip_learning_rate``): the model and the per-layer retention parameters train together on the task loss plus ``penalty`` times the L1 term (PoWER-BERT: the
   soft extraction weights; LTP: the soft masks); a token's soft keep-weight re-weights it as a key
   in every later layer.
3. PoWER-BERT: the retained count of each layer is fixed from the learned weights (non-increasing
   with depth).  Hard stage (``hard_steps`` at ``hard_learning_rate``): the model alone trains with
   tokens removed for real (top counts / above threshold; the first token always kept).
4. Sweep: the learned counts (PoWER) or thresholds (LTP) times each of ``scales``: dev accuracy and
   mean fraction of token-layers computed (one jitted pass over the dev set), and the measured
   seconds per example of the runner that gathers the kept tokens into shorter sequences against
   the full jitted model on the same trimmed inputs, at batch 1 and ``timing_batch``.
5. Output: ``results.json`` (every point, operating points nearest 1.5x and 2x measured batch-1
   speed-up), ``sweep.png``, and the model with its learned retention in ``workdir/model``
   (`efficient_nlp.dynamic.tokens.load`).
"""
from __future__ import annotations

import os

import jax
import numpy as np
import optax
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import train as train_lib
from efficient_nlp.dynamic import sweep, tokens
from efficient_nlp.dynamic.token_runner import TokenSkipRunner
from efficient_nlp.recipes.common import stage_config, teacher_and_task
from efficient_nlp.recipes.finetune import logits_loss
from efficient_nlp.recipes.outputs import save_outputs

METHODS = ("ltp", "power")
#: Everything but the retention parameters (the hard stage keeps them fixed).
BACKBONE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("token_skip")))


def scales(config) -> list[float]:
    values = [float(v) for v in str(config.token_skip.scales).split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"config.token_skip.scales={config.token_skip.scales!r}: give positive comma-separated "
                         "factors of the learned counts / thresholds, e.g. '0.5,1,1.5'")
    return values


def check_config(config) -> list[float]:
    c = config.token_skip
    if c.method not in METHODS:
        raise ValueError(f"config.token_skip.method={c.method!r}; use one of {METHODS}")
    if float(c.penalty) < 0:
        raise ValueError(f"config.token_skip.penalty={c.penalty} must be >= 0")
    return scales(config)


def hard_loss(model, batch, rngs):
    """Task loss with tokens removed by the fixed counts / thresholds (deterministic forward)."""
    logits, _ = tokens.hard_forward(model, batch)
    return logits_loss(logits, batch["labels"])


def _hard(model, batch):
    return tokens.hard_forward(model, batch)


def _is_skip(path) -> bool:
    return any(getattr(k, "key", None) == "token_skip" for k in path)


def soft_optimizer(config, steps):
    """AdamW of ``config.train`` for the model and the same at ``token_skip.skip_learning_rate``
    for the retention parameters (thresholds live on the scale of attention probabilities, ~1/n,
    and PoWER's weights must travel from 1 towards 0: the model's rate would barely move them)."""
    model_opt = train_lib.make_optimizer(stage_config(config, steps, config.token_skip.soft_learning_rate), steps)
    skip_opt = train_lib.make_optimizer(stage_config(config, steps, config.token_skip.skip_learning_rate), steps)

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "skip" if _is_skip(path) else "model", params)

    return optax.multi_transform({"model": model_opt, "skip": skip_opt}, labels)


def _stage(model, loss_fn, trainable, task, config, workdir, name, steps, learning_rate, optimizer=None):
    if int(steps) <= 0:
        return model
    cfg = stage_config(config, steps, learning_rate)

    def batches(start):
        return data_lib.train_batches(task.train, cfg.train.batch_size, seed=cfg.train.seed, start_step=start)

    model, _ = train_lib.fit(model, loss_fn, batches, config=cfg, workdir=os.path.join(workdir, name),
                             trainable=trainable, optimizer=optimizer,
                             lr_schedule=None if optimizer is None else train_lib.make_lr_schedule(cfg, int(steps)))
    return model


def work_fraction(kept, attention_mask) -> np.ndarray:
    """Per row, the fraction of token-layers computed: the tokens each layer runs on
    (`tokens.layer_tokens`) over the layers times the row's real tokens."""
    n = np.asarray(attention_mask).sum(axis=1).astype(np.float64)
    run = np.asarray(tokens.layer_tokens(kept, attention_mask), np.float64)
    return run.sum(axis=1) / (run.shape[1] * n)


def scaled(model, method, base, s):
    """``model`` with the learned counts (PoWER) / thresholds (LTP) ``base`` times ``s``."""
    if method == "power":
        max_len = int(model.token_skip.max_len)
        return tokens.set_counts(model, tuple(int(np.clip(round(c * s), 1, max_len)) for c in base))
    return tokens.set_thresholds(model, tuple(float(t) * s for t in base))


def run(config, workdir):
    """Trains, sweeps and measures token skipping; returns the results dict."""
    train_lib.init_distributed(config)
    factors = check_config(config)
    c = config.token_skip
    teacher_dir, task, teacher, _, _ = teacher_and_task(config, workdir)
    model = tokens.add_token_skip(teacher, c.method, max_len=int(config.data.max_length),
                                  temperature=float(c.temperature))
    model = _stage(model, tokens.make_loss(penalty=float(c.penalty)), nnx.Param, task, config, workdir,
                   "soft", c.soft_steps, c.soft_learning_rate, soft_optimizer(config, int(c.soft_steps)))
    if c.method == "power":
        model = tokens.fix_retention(model)
    model = _stage(model, hard_loss, BACKBONE, task, config, workdir, "hard", c.hard_steps, c.hard_learning_rate)
    base = tuple(model.token_skip.counts) if c.method == "power" else tuple(
        float(t) for t in np.asarray(model.token_skip.threshold.get_value()))
    labels = np.asarray(task.dev["labels"])
    bs = config.train.eval_batch_size

    def accuracy(lg):  # the task's main metric (accuracy for the built-in task; MCC, F1 ... for others)
        return data_lib.compute_metrics(task.spec, lg, labels)[task.spec.metrics[0]]

    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "method": c.method, "learned": list(base),
               "teacher_accuracy": accuracy(train_lib.predict(teacher, task.dev, bs))}
    results["full_accuracy"] = results["teacher_accuracy"]
    b1 = sweep.timing_batches(task.dev, c.timing_examples, 1)
    batched = sweep.timing_batches(task.dev, c.timing_examples, c.timing_batch)
    full = sweep.full_model_fn(teacher)
    points = []
    for s in factors:
        m = scaled(model, c.method, base, s)
        logits, kept = train_lib.predict(m, task.dev, bs, predict_fn=_hard)
        points.append({"scale": s, "setting": list(m.token_skip.counts) if c.method == "power" else
                       [float(t) for t in np.asarray(m.token_skip.threshold.get_value())],
                       "accuracy": accuracy(logits),
                       "work": float(np.mean(work_fraction(kept, task.dev["attention_mask"]))),
                       **sweep.measured_speedups(full, TokenSkipRunner(m), b1, batched, rounds=int(c.rounds))})
        print(f"[{c.method} x{s:g}] accuracy {points[-1]['accuracy']:.4f}, token-layers {points[-1]['work']:.2f}, "
              f"speed-up batch 1 {points[-1]['speedup_b1']:.2f}x, batched {points[-1]['speedup_batched']:.2f}x")
    results["points"] = points
    results["operating_points"] = sweep.operating_points(points, full_accuracy=results["full_accuracy"])
    out = os.path.join(workdir, "model")
    if train_lib.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        sweep.plot_sweep(points, os.path.join(workdir, "sweep.png"), work="fraction of token-layers computed",
                         work_key="work", full_accuracy=results["full_accuracy"],
                         title=f"token skipping ({c.method}), {task.spec.name}")
        tokens.save(model, out)
        task.tokenizer.save_pretrained(out)
    save_outputs(workdir, results, task.tokenizer, {})
    print(format_results(results))
    print(f"Model with token skipping: {out} (efficient_nlp.dynamic.tokens.load); sweep plot: "
          f"{os.path.join(workdir, 'sweep.png')}; results: {os.path.join(workdir, 'results.json')}")
    return results


def format_results(results) -> str:
    lines = [f"Task {results['task']}: token skipping ({results['method']}); teacher accuracy "
             f"{results['teacher_accuracy']:.4f}",
             f"{'point':>12}{'scale':>7}{'accuracy':>10}{'token-layers':>14}{'b1 ms':>8}{'x b1':>7}{'x batched':>10}"]
    for target, p in results["operating_points"].items():
        lines.append(f"{target:>12}{p['scale']:>7g}{p['accuracy']:>10.4f}{p['work']:>14.2f}{p['dynamic_ms_b1']:>8.2f}"
                     f"{p['speedup_b1']:>7.2f}{p['speedup_batched']:>10.2f}")
    return "\n".join(lines)
