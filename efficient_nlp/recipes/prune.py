"""Pruning recipe (docs/pruning.md): prune a model (any family of `efficient_nlp.models`) while
fine-tuning it on a task.

The pruning optimizer is `efficient_nlp.prune.pruning` around the default AdamW, so the masks
live in the optimizer state and `train.fit` checkpoints / resumes / replicates them as any other
state.  Criterion (magnitude, movement, saliency, random), rules (regex + pattern + sparsity +
distribution) and schedule (one-shot, gradual cubic) come from ``config.prune``::

    config.prune.criterion = "movement"
    config.prune.criterion_kwargs = dict(learning_rate=1e-2)  # optional: the criterion's arguments
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=0, end_step=200, frequency=10)
    config.prune.rules = [dict(regex=r"layers\\.\\d+\\.(attention|ffn)\\..*kernel$",
                               pattern="unstructured", sparsity=0.9, distribution="global")]
    config.prune.shrink = False   # True: physically remove pruned heads / FFN neurons at the end
    config.prune.regrow = True    # False: pruned weights are never revived (monotone masks)

``config.prune.method`` selects another procedure on the same pieces (see `run`): ``lottery``
(configs/prune_lottery.py), ``earlybert`` (configs/prune_earlybert.py), ``flops``
(configs/prune_structured_flops.py) and ``layerdrop`` (configs/prune_layerdrop.py).

Prints dev metrics before/after and the per-layer sparsity; writes ``workdir/sparsity.png``,
``workdir/results.json``, the pruned model ``workdir/model`` and, with ``shrink``, the smaller
model ``workdir/model_shrunk`` (params / FLOPs / latency report in the results).
"""
import os

from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import models, prune
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.recipes.finetune import load_model_and_data, task_loss

_PATTERN_KEYS = ("block_shape", "axis", "n", "m")
_FAMILY_PATTERNS = ("heads", "ffn_neurons", "layers")


def build_rules(rules, model):
    """``[(regex, PruneRule)]`` from config rule dicts; the patterns that read the model family
    (``heads``, ``ffn_neurons``, ``layers``) get the model (``heads`` reads its head width)."""
    out = []
    for r in rules:
        r = dict(r)
        kwargs = {k: r[k] for k in _PATTERN_KEYS if k in r}
        if "block_shape" in kwargs:
            kwargs["block_shape"] = tuple(kwargs["block_shape"])
        if r.get("pattern") in _FAMILY_PATTERNS:
            kwargs["family"] = model
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


METHODS = ("mask", "lottery", "earlybert", "flops", "layerdrop")


def run(config, workdir):
    """Prunes while fine-tuning; returns dev metrics, sparsity and (with shrink) the report.

    ``config.prune.method`` picks the procedure (default ``"mask"``):

    * ``mask``: masks in the optimizer state with the configured criterion and schedule;
    * ``lottery``: iterative magnitude pruning with rewinding (``config.prune.lottery``:
      ``rounds``, ``rewind_step``), `prune.lottery_ticket`;
    * ``earlybert``: gate search with L1 until the head / neuron mask stabilises, then the
      ticket is physically shrunk from the pretrained weights and fine-tuned
      (``config.prune.earlybert``), `prune.earlybert_search`;
    * ``flops``: heads + FFN neurons chosen by score to a FLOPs target
      (``config.prune.flops``: ``target``, ``criterion``, ``score_batches``), fixed masks while
      fine-tuning, then physical removal;
    * ``layerdrop``: fine-tuning with LayerDrop (``config.prune.layerdrop``: ``rate``, ``keep``)
      then removal of layers, evaluated with and without them.
    """
    train_lib.init_distributed(config)
    method = config.prune.get("method", "mask") or "mask"
    if method not in METHODS:
        raise ValueError(f"unknown config.prune.method {method!r}; choose one of {METHODS}")
    model, task_data = load_model_and_data(config)
    spec = task_data.spec
    eval_fn = train_lib.make_eval_fn(
        task_data.dev, config.train.eval_batch_size,
        lambda predictions, labels, weights: data_lib.compute_metrics(spec, predictions, labels, weights))
    before = eval_fn(model)
    num_steps = config.train.num_steps

    def batches(start_step):
        return data_lib.train_batches(task_data.train, config.train.batch_size,
                                      seed=config.train.seed, start_step=start_step)

    def final_eval(history):
        return {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}

    rules = build_rules(config.prune.rules, model) if config.prune.get("rules") else []
    results = {"task": spec.name, "method": method, "criterion": config.prune.get("criterion", "magnitude"),
               "dev_before": before}
    original, structure = model, None
    if method == "mask":
        tx = prune.pruning(train_lib.make_optimizer(config, num_steps), rules,
                           criterion=prune.get_criterion(config.prune.criterion,
                                                         **dict(config.prune.get("criterion_kwargs") or {})),
                           schedule=build_schedule(config.prune.schedule),
                           regrow=bool(config.prune.get("regrow", True)))
        model, history = train_lib.fit(model, task_loss, batches, config=config, workdir=workdir,
                                       eval_fn=eval_fn, optimizer=tx,
                                       lr_schedule=train_lib.make_lr_schedule(config, num_steps))
        after = final_eval(history)
    elif method == "lottery":
        lt = config.prune.lottery
        res = prune.lottery_ticket(model, task_loss, batches, config=config, workdir=workdir, rules=rules,
                                   rounds=int(lt.rounds), rewind_step=int(lt.rewind_step), eval_fn=eval_fn)
        model, after = res.model, {k: v for k, v in res.rounds[-1].items()
                                   if k not in ("round", "sparsity", "target")}
        results["rounds"] = res.rounds
        print("\n".join(f"round {r['round']}: sparsity {r['sparsity']:.3f} " +
                        " ".join(f"{k}={v:.4f}" for k, v in r.items() if k not in ("round", "sparsity", "target"))
                        for r in res.rounds))
    elif method == "earlybert":
        eb = config.prune.earlybert
        search = prune.earlybert_search(
            model, task_loss, batches, config=config, head_sparsity=eb.head_sparsity,
            ffn_sparsity=eb.ffn_sparsity, l1_heads=eb.l1_heads, l1_ffn=eb.l1_ffn,
            distribution=eb.distribution, check_every=eb.check_every, threshold=eb.threshold,
            window=eb.window, max_steps=eb.max_search_steps)
        structure = search.structure
        results["search"] = {"steps": search.steps, "stable": search.stable, "distances": search.distances,
                             "structure": structure}
        print(f"EarlyBERT search: {search.steps} updates, mask stable: {search.stable}")
        # The ticket: pretrained weights with the gated units removed for real, then fine-tuned.
        model, _ = prune.shrink(original, structure=structure)
        model, history = train_lib.fit(model, task_loss, batches, config=config,
                                       workdir=os.path.join(workdir, "finetune"), eval_fn=eval_fn)
        after = final_eval(history)
    elif method == "flops":
        fc = config.prune.flops
        if fc.criterion == "magnitude":
            scores = prune.unit_scores(model)
        elif fc.criterion in ("saliency", "taylor"):
            scores = prune.unit_scores(model, prune.taylor_scores(model, task_loss, batches(0),
                                                                  int(fc.score_batches), config.train.seed))
        else:
            raise ValueError(f"config.prune.flops.criterion must be magnitude or saliency, got {fc.criterion!r}")
        structure, flops_after = prune.flops_structure(model, fc.target, seq_len=config.data.max_length,
                                                       scores=scores)
        masks = prune.structure_masks(model, structure)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = prune.apply_masks(params, _tree(params, masks))
        model = nnx.merge(graphdef, params, rest)
        rules = [prune.rule(_exactly(masks), "unstructured", 0.0)]
        tx = prune.pruning(train_lib.make_optimizer(config, num_steps), rules, masks=masks)
        model, history = train_lib.fit(model, task_loss, batches, config=config, workdir=workdir,
                                       eval_fn=eval_fn, optimizer=tx,
                                       lr_schedule=train_lib.make_lr_schedule(config, num_steps))
        after = final_eval(history)
        results["flops_target"] = fc.target
    else:  # layerdrop
        ld = config.prune.layerdrop
        prune.with_layer_drop(model, float(ld.rate))
        model, history = train_lib.fit(model, task_loss, batches, config=config, workdir=workdir,
                                       eval_fn=eval_fn)
        after = final_eval(history)
        full = prune.full_structure(model)
        n = len(full["layers"])
        keep = ld.keep
        if isinstance(keep, str):
            keep = prune.every_other(n) if keep == "every_other" else [int(i) for i in keep.split(",")]
        keep = [int(i) for i in keep]
        structure = {"layers": keep, "heads": [full["heads"][i] for i in keep],
                     "neurons": [full["neurons"][i] for i in keep]}
    results["dev_after"] = after
    weights = {k: v.get_value() for k, v in models.named_params(model).items()}
    regexes = [regex for regex, _ in rules] if method in ("mask", "lottery") else [prune.site_regex(model)]
    rows = prune.sparsity_summary(weights, regexes)
    print(prune.format_summary(rows))
    results["sparsity_per_layer"] = prune.layer_summary(rows)
    results["sparsity_total"] = sum(r["zeros"] for r in rows) / max(sum(r["size"] for r in rows), 1)
    small = None
    if method == "earlybert":
        small, model = model, original  # the fine-tuned ticket IS the shrunk model; report vs dense
    if config.prune.get("shrink") or method in ("flops", "layerdrop", "earlybert"):
        if small is None:
            small, structure = prune.shrink(model, structure=structure)
        report = prune.shrink_report(model, small, seq_len=config.data.max_length,
                                     measure=bool(config.prune.get("measure_latency", False)))
        print(report.format())
        results["shrink"] = {"structure": structure, "params_before": report.params_before,
                             "params_after": report.params_after, "flops_before": report.flops_before,
                             "flops_after": report.flops_after, "speedup": report.speedup,
                             "dev_shrunk": eval_fn(small)}
    if method == "earlybert":
        model = None  # only the shrunk, fine-tuned ticket is saved
    print(format_results(results))
    if train_lib.is_main_process():
        prune.plot_summary(rows, os.path.join(workdir, "sparsity.png"))
    save_outputs(workdir, results, task_data.tokenizer, {"model": model, "model_shrunk": small})
    return results


def _exactly(names):
    """A rule regex selecting exactly the parameters ``names``."""
    import re
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def _tree(params, named):
    """A masks pytree like ``params`` from ``{name: mask}`` (True elsewhere)."""
    import jax
    import jax.numpy as jnp

    from efficient_nlp import tree as tree_lib
    return jax.tree_util.tree_map_with_path(lambda p, w: jnp.asarray(named.get(tree_lib.path_str(p), True)), params)


def format_results(results):
    lines = [f"Task {results['task']} ({results['method']}, {results['criterion']} pruning, total sparsity "
             f"{results['sparsity_total']:.3f})", f"{'metric':<12}{'before':>10}{'after':>10}"]
    for key, value in results["dev_after"].items():
        lines.append(f"{key:<12}{results['dev_before'][key]:>10.4f}{value:>10.4f}")
    return "\n".join(lines)
