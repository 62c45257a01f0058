"""Pruning recipe (METHODS.md 2.1): prune a BERT while fine-tuning it on a task.

The pruning optimizer is `efficient_nlp.prune.pruning` around the default AdamW, so the masks
live in the optimizer state and `train.fit` checkpoints / resumes / replicates them as any other
state.  Criterion (magnitude, movement, saliency, random), rules (regex + pattern + sparsity +
distribution) and schedule (one-shot, gradual cubic) come from ``config.prune``::

    config.prune.criterion = "movement"
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=0, end_step=200, frequency=10)
    config.prune.rules = [dict(regex=r"layers\\.\\d+\\.(attention|ffn)\\..*kernel$",
                               pattern="unstructured", sparsity=0.9, distribution="global")]
    config.prune.shrink = False   # True: physically remove pruned heads / FFN neurons at the end

Prints dev metrics before/after and the per-layer sparsity; writes ``workdir/sparsity.png``,
``workdir/results.json``, the pruned model ``workdir/model`` and, with ``shrink``, the smaller
model ``workdir/model_shrunk`` (params / FLOPs / latency report in the results).
"""
import os

from efficient_nlp import data as data_lib
from efficient_nlp import models, prune
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.recipes.finetune import load_model_and_data, task_loss

_PATTERN_KEYS = ("block_shape", "axis", "n", "m")


def build_rules(rules, model):
    """``[(regex, PruneRule)]`` from config rule dicts; ``heads`` gets the model's head_dim."""
    out = []
    for r in rules:
        r = dict(r)
        kwargs = {k: r[k] for k in _PATTERN_KEYS if k in r}
        if "block_shape" in kwargs:
            kwargs["block_shape"] = tuple(kwargs["block_shape"])
        if r.get("pattern") == "heads":
            kwargs["head_dim"] = model.config.attention_head_dim
        dist = r.get("distribution", "global")
        if not isinstance(dist, str):
            dist = dict(dist)
        out.append(prune.rule(r["regex"], r.get("pattern", "unstructured"), r.get("sparsity", 0.5),
                              dist, r.get("normalize", True), **kwargs))
    return out


def build_schedule(schedule):
    s = dict(schedule)
    kind = s.pop("kind", "one_shot")
    return prune.get_schedule(kind, **s)


def run(config, workdir):
    """Prunes while fine-tuning; returns dev metrics, sparsity and (with shrink) the report."""
    train_lib.init_distributed(config)
    model, task_data = load_model_and_data(config)
    spec = task_data.spec
    eval_fn = train_lib.make_eval_fn(
        task_data.dev, config.train.eval_batch_size,
        lambda predictions, labels, weights: data_lib.compute_metrics(spec, predictions, labels, weights))
    before = eval_fn(model)
    num_steps = config.train.num_steps
    rules = build_rules(config.prune.rules, model)
    tx = prune.pruning(train_lib.make_optimizer(config, num_steps), rules,
                       criterion=config.prune.criterion, schedule=build_schedule(config.prune.schedule))

    def batches(start_step):
        return data_lib.train_batches(task_data.train, config.train.batch_size,
                                      seed=config.train.seed, start_step=start_step)

    model, history = train_lib.fit(model, task_loss, batches, config=config, workdir=workdir,
                                   eval_fn=eval_fn, optimizer=tx,
                                   lr_schedule=train_lib.make_lr_schedule(config, num_steps))
    after = {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}
    weights = {k: v.get_value() for k, v in models.named_params(model).items()}
    rows = prune.sparsity_summary(weights, [regex for regex, _ in rules])
    print(prune.format_summary(rows))
    results = {"task": spec.name, "criterion": config.prune.criterion,
               "dev_before": before, "dev_after": after,
               "sparsity_per_layer": prune.layer_summary(rows),
               "sparsity_total": sum(r["zeros"] for r in rows) / max(sum(r["size"] for r in rows), 1)}
    small = None
    if config.prune.shrink:
        small, structure = prune.shrink(model)
        report = prune.shrink_report(model, small, seq_len=config.data.max_length,
                                     measure=bool(config.prune.measure_latency))
        print(report.format())
        results["shrink"] = {"structure": structure, "params_before": report.params_before,
                             "params_after": report.params_after, "flops_before": report.flops_before,
                             "flops_after": report.flops_after, "speedup": report.speedup,
                             "dev_shrunk": eval_fn(small)}
    print(format_results(results))
    if train_lib.is_main_process():
        prune.plot_summary(rows, os.path.join(workdir, "sparsity.png"))
    save_outputs(workdir, results, task_data.tokenizer, {"model": model, "model_shrunk": small})
    return results


def format_results(results):
    lines = [f"Task {results['task']} ({results['criterion']} pruning, total sparsity "
             f"{results['sparsity_total']:.3f})", f"{'metric':<12}{'before':>10}{'after':>10}"]
    for key, value in results["dev_after"].items():
        lines.append(f"{key:<12}{results['dev_before'][key]:>10.4f}{value:>10.4f}")
    return "\n".join(lines)
