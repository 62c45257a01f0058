"""BinaryBERT adaptive splitting: a family of binary models of different sizes from one half-width
ternary model (docs/binarybert_adaptive.md; `efficient_nlp.quant.adaptive`).

    python train.py --config configs/binarybert_adaptive.py --workdir runs/binarybert_adaptive \\
        --config.teacher_dir=runs/quickstart/model

1. Teacher: ``config.teacher_dir`` (empty: fine-tuned first, as the distill recipe does).
2. Half-width ternary model: the packed artefact ``config.adaptive.ternary_dir`` (e.g.
   ``<binarybert workdir>/half_width_ternary/packed`` of `efficient_nlp.recipes.binarybert`,
   restored unfrozen: its dequantized weights become the latent weights), or
   ``workdir/half_width_ternary/packed`` from an earlier run, or trained here exactly as the
   binarybert recipe's TWS branch does (``config.binarybert``, ``config.distill.stages``).
3. Sensitivity of every group (``config.adaptive.by``: part per layer, layer or part) on
   ``config.adaptive.sensitivity_examples`` training examples (a seeded sample; the dev split
   stays untouched): the score is minus the soft cross-entropy to the teacher's logits, the
   prediction-layer distillation loss the split models are fine-tuned with; value = gain per
   parameter, measured against the all-binary model (``config.adaptive.reference="binary"``,
   as in BinaryBERT) or as the loss of binarizing one group of the all-split model (``"split"``).
4. For every budget fraction ``f`` in ``config.adaptive.budgets`` the budget is
   ``C = C0 + f (C_full - C0)`` in ``config.adaptive.cost`` (``size_mb``, ``flops`` or ``bops``;
   ``C0`` all binary, ``C_full`` everything split), and every method of
   ``config.adaptive.methods`` (knapsack, random, uniform) picks the sites to split.  Each
   distinct assignment is split (`quant.split_model`) and fine-tuned with prediction-layer
   distillation for ``config.binarybert.finetune_steps`` steps.
5. Output: a table (budget, method, groups split, size MB, BOPs, dev metrics before / after
   fine-tuning), ``accuracy_vs_size.png``, ``sensitivity.json`` and ``results.json``.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from flax import nnx

from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.quant import adaptive
from efficient_nlp.quant.export import MANIFEST_FILE
from efficient_nlp.recipes import binarybert
from efficient_nlp.recipes.common import run_kd_stages, teacher_and_task
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.recipes.qat import quantized_student


def parse_list(value, valid, what) -> tuple[str, ...]:
    """``"knapsack,random"`` -> a tuple of names from ``valid``; anything else is a ValueError."""
    names = tuple(s.strip() for s in str(value).split(",") if s.strip())
    bad = [n for n in names if n not in valid]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"{what}={value!r}: give a comma-separated subset of {valid}")
    return names


def check_config(config):
    """Config-time validation; returns ``(methods, budgets)`` and the binarybert checks."""
    a = config.adaptive
    methods = parse_list(a.methods, adaptive.METHODS, "config.adaptive.methods")
    budgets = [float(f) for f in a.budgets]
    if not budgets or any(not 0.0 <= f <= 1.0 for f in budgets):
        raise ValueError(f"config.adaptive.budgets={list(a.budgets)}: fractions in [0, 1] of the splitting "
                         "cost (0 = all binary, 1 = everything split)")
    if a.cost not in adaptive.COST_KINDS:
        raise ValueError(f"config.adaptive.cost={a.cost!r}; valid: {adaptive.COST_KINDS}")
    if a.by not in adaptive.GROUPINGS:
        raise ValueError(f"config.adaptive.by={a.by!r}; valid: {adaptive.GROUPINGS}")
    if a.uniform_by not in ("part", "layer"):
        raise ValueError(f"config.adaptive.uniform_by={a.uniform_by!r}; use 'part' or 'layer'")
    if a.reference not in adaptive.REFERENCES:
        raise ValueError(f"config.adaptive.reference={a.reference!r}; valid: {adaptive.REFERENCES}")
    if int(a.sensitivity_examples) < 1:
        raise ValueError(f"config.adaptive.sensitivity_examples={a.sensitivity_examples!r} must be >= 1")
    return methods, budgets, binarybert.check_config(config)


def make_score_fn(arrays, batch_size, teacher_logits):
    """``score(model) = -mean soft cross-entropy(teacher logits, model logits)`` on ``arrays``
    (T = 1; higher is better): jitted prediction (`train.predict`), one compilation per graph."""
    target = np.asarray(teacher_logits, np.float32)

    def score(model):
        logits = train_lib.predict(model, arrays, batch_size)
        return -float(distill.soft_cross_entropy(np.asarray(logits, np.float32), target))

    return score


def _subset(arrays, n, seed):
    idx = np.sort(np.random.default_rng(seed).permutation(len(arrays["labels"]))[:n])
    return {k: v[idx] for k, v in arrays.items()}


def load_ternary(packed_dir, spec, calibration_batch):
    """``(half-width ternary model, its float architecture)`` from a packed artefact: the model
    config in the manifest, quantized with ``spec`` and restored unfrozen (TWN of the restored
    on-grid weights gives back the same codes; `efficient_nlp.quant.restore`)."""
    artifact = quant.load_packed(packed_dir)
    cfg = artifact["manifest"]["config"]
    if not cfg:
        raise ValueError(f"{packed_dir}: the artefact holds no model config; export a BertForSequenceClassification")
    half = models.BertForSequenceClassification(models.BertConfig(**cfg), rngs=nnx.Rngs(0))
    template, _ = quantized_student(half, spec, calibration_batch)
    return quant.restore(artifact, template, frozen=False), half


def ternary_model(config, workdir, teacher, tern_spec, checked, batches, eval_fn):
    """``(ternary model, float half-width architecture, source)``: see module docstring, step 2."""
    calibration = next(batches(0))
    given = config.adaptive.ternary_dir
    saved = os.path.join(workdir, "half_width_ternary", "packed")
    for source in (given, saved):
        if source and os.path.exists(os.path.join(source, MANIFEST_FILE)):
            tern, half = load_ternary(source, tern_spec, calibration)
            return tern, half, source
    if given:
        raise FileNotFoundError(f"config.adaptive.ternary_dir={given!r} holds no packed artefact (manifest.json)")
    bb = config.binarybert
    half, _ = binarybert.half_width_model(teacher, bb.width, bb.score, batches(0), config.train.seed)
    tern, _ = quantized_student(half, tern_spec, calibration)
    tern, _ = run_kd_stages(tern, teacher, config.distill.stages, checked["tws"], config,
                            os.path.join(workdir, "ternary"), batches, eval_fn)
    quant.save_packed(quant.export_packed(tern), saved)
    return tern, half, "trained"


def run(config, workdir):
    """Runs the adaptive family; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    methods, budgets, (_, tern_spec, _, checked) = check_config(config)
    a = config.adaptive
    teacher_dir, task, teacher, batches, eval_fn = teacher_and_task(config, workdir)
    tern, half, source = ternary_model(config, workdir, teacher, tern_spec, checked, batches, eval_fn)
    sample = {k: v[:1] for k, v in task.dev.items()}
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "ternary_source": source,
               "teacher": eval_fn(teacher), "ternary": eval_fn(tern), "cost_kind": a.cost, "rows": []}

    sites = quant.splittable_sites(tern)
    groups = adaptive.group_sites(sites, a.by)
    selection = _subset(task.train, int(a.sensitivity_examples), int(a.seed))
    bs = config.train.eval_batch_size
    score = make_score_fn(selection, bs, train_lib.predict(teacher, selection, bs))
    base_score, sens = adaptive.sensitivity(tern, groups, score, reference=a.reference)
    results["sensitivity"] = {"reference": a.reference, "reference_score": base_score,
                              "groups": {g: vars(s) for g, s in sens.items()}}
    base, extra = adaptive.split_costs(tern, sites, a.cost, sample)
    values = {g: s.value for g, s in sens.items()}
    full = base + math.fsum(extra.values())

    done = {}
    for f in budgets:
        for method in methods:
            choice = adaptive.choose_split(groups, values, extra, base + f * (full - base), base=base,
                                           method=method, seed=int(a.seed), uniform_by=a.uniform_by)
            if choice.sites not in done:
                done[choice.sites] = _train_split(config, workdir, f"{f:g}_{method}", tern, half, tern_spec,
                                                  choice.sites, teacher, checked, batches, eval_fn, sample)
            results["rows"].append(dict(budget=f, method=method, groups=list(choice.units),
                                        num_sites=len(choice.sites), value=choice.value,
                                        cost=base + choice.cost, **done[choice.sites]))
    results["budget_range"] = {"C0": base, "C_full": full}
    print(format_results(results))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sensitivity.json"), "w") as fh:
        json.dump(results["sensitivity"], fh, indent=2)
    plot_family(results, os.path.join(workdir, "accuracy_vs_size.png"))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def _train_split(config, workdir, name, tern, half, spec, sites, teacher, checked, batches, eval_fn, sample):
    """Splits ``sites``, fine-tunes (prediction-layer distillation); metrics and costs."""
    binary, _ = quant.split_model(tern, list(sites))
    cost = quant.cost_report(half, spec, sample, split=list(sites))
    out = {"size_mb": cost.size_mb, "bops": cost.bops, "flops": cost.flops, "before": eval_fn(binary)}
    stage = binarybert.finetune_stage(config)
    if stage["num_steps"] > 0:
        _, stages = run_kd_stages(binary, teacher, [stage], checked["finetune"], config,
                                  os.path.join(workdir, "split", name), batches, eval_fn)
        out["after"] = dict(stages[stage["name"]])
    else:
        out["after"] = out["before"]
    return out


def format_results(results) -> str:
    """One line per (budget, method): groups split, size, BOPs, accuracy before / after."""
    metric = next(iter(results["teacher"]))
    lines = [f"Task {results['task']}: adaptive splitting ({results['cost_kind']} budget, sensitivity vs all-"
             f"{results['sensitivity']['reference']}; ternary model: "
             f"{results['ternary_source']})",
             f"teacher {metric} {results['teacher'][metric]:.4f}; half-width ternary {results['ternary'][metric]:.4f}",
             f"{'budget':>6} {'method':<9}{'split':>6}{'size MB':>9}{'BOPs G':>9}{'before':>9}{'after':>9}  groups"]
    for r in results["rows"]:
        lines.append(f"{r['budget']:>6.2f} {r['method']:<9}{r['num_sites']:>6}{r['size_mb']:>9.3f}"
                     f"{r['bops'] / 1e9:>9.4f}{r['before'][metric]:>9.4f}{r['after'][metric]:>9.4f}  "
                     + ",".join(r["groups"])[:60])
    return "\n".join(lines)


def plot_family(results, path) -> str:
    """Dev metric after fine-tuning against stored size, one series per method (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(iter(results["teacher"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in results["rows"])):
        pts = sorted((r["size_mb"], r["after"][metric]) for r in results["rows"] if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^"[i % 3], label=method)
    ax.axhline(results["ternary"][metric], color="gray", ls=":", lw=1, label="half-width ternary")
    ax.set_xlabel("stored size (MB)")
    ax.set_ylabel(f"dev {metric}")
    ax.legend(fontsize=8)
    ax.set_title("adaptive splitting: accuracy vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
