"""Few-shot pruning by cross distillation (docs/cross_distillation.md): methods x shots table over seeds.

    python train.py --config configs/cd_cnn.py --workdir runs/cd_cnn
    python train.py --config configs/cd_bert.py --workdir runs/cd_bert

``config.model_kind``:

* ``"cnn"``: a `SmallCNN` teacher trained on scikit-learn's digits (train split) in the run
  (seconds), evaluated on the test split;
* ``"bert"`` (or ``"encoder"``): a fine-tuned teacher of any family of `efficient_nlp.models`
  (``config.teacher_dir``; empty: ``config.model_dir`` is fine-tuned on ``config.data`` first, as
  in the distill recipe), evaluated on the dev split; its layers are read from the model family
  description (`efficient_nlp.prune.fewshot.encoder_adapter`).

For every sparsity in ``config.sparsities``, K in ``config.shots`` and seed in ``config.seeds``
the few-shot set holds exactly K training examples per class (`data.sample_k_per_class`) and
every method of ``config.methods`` prunes the teacher (``config.structure``: unstructured, or
channels / neurons / heads):

``l1`` data-free L1-norm; ``bp`` L1 + back-propagation fine-tuning (cross-entropy); ``fitnet``
L1 + FitNet hints; ``wo_cd`` layer-wise regression without cross connections; ``cd`` cross
distillation (``mu``); ``scd`` soft CD (``alpha``, ``beta``).  The layer-wise methods take
``config.cd`` (sparsifier ``topk`` or ``prox``, steps, learning rate, ramp, optional end-to-end
``finetune_steps``).

Writes ``results.json`` (every run with per-layer sparsity and estimation errors, plus the
tables), ``results.md`` (methods x shots, mean +- std of accuracy over seeds, one table per
sparsity) and ``error_ratio.png`` (per-layer estimation-error ratio CD / w/o CD); with
``config.save_models`` (encoders only) also every pruned student as a HF directory
``models/<method>_sp<sparsity>_k<K>_seed<seed>`` (its path in the run's ``model_dir``).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from efficient_nlp import data as data_lib
from efficient_nlp.prune import fewshot
from efficient_nlp.recipes.outputs import save_outputs

METHODS = ("l1", "bp", "fitnet", "wo_cd", "cd", "scd")
MODEL_KINDS = ("cnn", "bert", "encoder")  # "bert" and "encoder" are the same: any encoder family
_LAYERWISE = {"wo_cd": "layerwise", "cd": "cd", "scd": "scd"}


# ----------------------------------------------------------------------------- setups
def _cnn_setup(config):
    from flax import nnx

    from efficient_nlp.models.cnn import SmallCNN, fit_cnn

    c = config.cnn
    split = data_lib.load_digits(test_fraction=c.test_fraction, seed=c.data_seed)
    teacher = SmallCNN(tuple(c.channels), tuple(c.pools), c.hidden, rngs=nnx.Rngs(c.teacher_seed))
    fit_cnn(teacher, split["train"]["images"], split["train"]["labels"], steps=c.teacher_steps,
            batch_size=c.batch_size, learning_rate=c.teacher_lr, seed=c.teacher_seed)
    adapter = fewshot.cnn_adapter(teacher, fewshot.cnn_rules(config.structure,
                                                             first_conv=bool(c.get("prune_first_conv", False)),
                                                             dense=bool(c.get("prune_dense", False))))
    train = {"images": split["train"]["images"], "labels": split["train"]["labels"]}
    test = {"images": split["test"]["images"], "labels": split["test"]["labels"]}
    return teacher, adapter, train, test, None


def _encoder_setup(config, workdir):
    from efficient_nlp import models
    from efficient_nlp.recipes.common import load_data, resolve_teacher

    teacher_dir = resolve_teacher(config, workdir)
    task = load_data(config, teacher_dir)
    teacher = models.from_pretrained(teacher_dir, num_labels=task.spec.num_labels)
    adapter = fewshot.encoder_adapter(teacher, fewshot.encoder_rules(teacher, config.structure))
    dev = dict(task.dev)
    if config.get("max_eval_examples"):
        dev = {k: v[: config.max_eval_examples] for k, v in dev.items()}
    return teacher, adapter, dict(task.train), dev, task.tokenizer


# ----------------------------------------------------------------------------- one run
def run_method(method, teacher, adapter, shots, sparsity, config):
    """-> (student, info) for one method on one few-shot set."""
    c, b = config.cd, config.baselines
    if method in _LAYERWISE:
        student, info = fewshot.prune_layerwise(
            teacher, adapter, shots, loss=_LAYERWISE[method], mu=c.mu, alpha=c.alpha, beta=c.beta,
            sparsity=sparsity, sparsifier=c.sparsifier, steps=c.steps, learning_rate=c.learning_rate,
            ramp=c.ramp, lam_extra=c.lam_extra)
        fewshot.finetune(student, teacher, adapter, shots, fewshot.ce_loss(adapter), steps=c.finetune_steps,
                         learning_rate=c.finetune_lr)
        return student, info
    student = fewshot.l1_prune(teacher, adapter, sparsity=sparsity)
    if method == "bp":
        fewshot.finetune(student, teacher, adapter, shots, fewshot.ce_loss(adapter), steps=b.bp_steps,
                         learning_rate=b.bp_lr)
    elif method == "fitnet":
        fewshot.finetune(student, teacher, adapter, shots, fewshot.fitnet_loss(adapter), steps=b.fitnet_steps,
                         learning_rate=b.fitnet_lr)
    elif method != "l1":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return student, {}


def run(config, workdir):
    """Runs the methods x shots x seeds grid; returns the results dict (also ``results.json``)."""
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"config.methods: unknown method {m!r}; choose from {METHODS}")
    if config.model_kind not in MODEL_KINDS:
        raise ValueError(f"config.model_kind must be one of {MODEL_KINDS}, got {config.model_kind!r}")
    save = bool(config.get("save_models", False))
    if save and config.model_kind == "cnn":
        raise ValueError("config.save_models writes HF directories: only for model_kind='bert' (any encoder)")
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    setup = _cnn_setup(config) if config.model_kind == "cnn" else _encoder_setup(config, workdir)
    teacher, adapter, train, test, tokenizer = setup
    err_data = {k: v[: config.error_examples] for k, v in test.items()}
    results = {"model_kind": config.model_kind, "structure": config.structure,
               "teacher_accuracy": fewshot.accuracy(adapter, teacher, test),
               "layers": [s.name for s in adapter.layers], "runs": []}
    print(f"teacher accuracy {results['teacher_accuracy']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    for sparsity in config.sparsities:
        for k in config.shots:
            for seed in config.seeds:
                idx = data_lib.sample_k_per_class(train["labels"], int(k), seed=int(seed))
                shots = {key: v[idx] for key, v in train.items()}
                for method in config.methods:
                    student, info = run_method(method, teacher, adapter, shots, float(sparsity), config)
                    acc = fewshot.accuracy(adapter, student, test)
                    results["runs"].append({
                        "sparsity": float(sparsity), "shots": int(k), "seed": int(seed), "method": method,
                        "accuracy": acc, "layer_sparsity": fewshot.sparsity_per_layer(student, adapter),
                        "estimation_error": fewshot.estimation_errors(teacher, student, adapter, err_data),
                        "layer_losses": info.get("layers", [])})
                    if save:
                        out = os.path.join(workdir, "models", f"{method}_sp{float(sparsity):g}_k{k}_seed{seed}")
                        save_outputs(out, None, tokenizer, {"": student})
                        results["runs"][-1]["model_dir"] = out
                    print(f"sparsity {sparsity} K={k} seed={seed} {method:<7} acc {acc:.4f} "
                          f"({time.time() - t0:.0f}s)", flush=True)
    results["tables"] = make_tables(results)
    results["error_ratio"] = error_ratios(results)
    results["seconds"] = time.time() - t0
    md = format_tables(results)
    print(md)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if results["error_ratio"]:
        plot_error_ratios(results, os.path.join(workdir, "error_ratio.png"))
    return results


# ----------------------------------------------------------------------------- outputs
def make_tables(results) -> dict:
    """``{sparsity: {method: {shots: {"mean", "std", "n"}}}}`` of the accuracies."""
    out = {}
    for r in results["runs"]:
        cell = out.setdefault(str(r["sparsity"]), {}).setdefault(r["method"], {}).setdefault(str(r["shots"]), [])
        cell.append(r["accuracy"])
    return {s: {m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in ks.items()}
                for m, ks in ms.items()} for s, ms in out.items()}


def error_ratios(results) -> dict:
    """``{sparsity: {shots: {layer: mean over seeds of err_cd / err_wo_cd}}}`` (when both ran)."""
    by = {}
    for r in results["runs"]:
        by[(r["sparsity"], r["shots"], r["seed"], r["method"])] = r["estimation_error"]
    out = {}
    for (s, k, seed, m), err in by.items():
        if m != "cd" or (s, k, seed, "wo_cd") not in by:
            continue
        base = by[(s, k, seed, "wo_cd")]
        cell = out.setdefault(str(s), {}).setdefault(str(k), {})
        for layer, e in err.items():
            cell.setdefault(layer, []).append(e / max(base[layer], 1e-30))
    return {s: {k: {lay: float(np.mean(v)) for lay, v in ls.items()} for k, ls in ks.items()} for s, ks in out.items()}


_NAMES = {"l1": "L1-norm (no data)", "bp": "L1 + back-prop", "fitnet": "L1 + FitNet hints",
          "wo_cd": "layer-wise (w/o CD)", "cd": "CD", "scd": "soft CD"}


def format_tables(results) -> str:
    lines = [f"Few-shot pruning ({results['model_kind']}, {results['structure']}); teacher accuracy "
             f"{results['teacher_accuracy']:.4f}; accuracy mean +- std over seeds", ""]
    for s, ms in results["tables"].items():
        shots = sorted({k for ks in ms.values() for k in ks}, key=int)
        lines.append(f"### sparsity {float(s):.0%}")
        lines.append("| method | " + " | ".join(f"K={k}" for k in shots) + " |")
        lines.append("| --- |" + " --- |" * len(shots))
        for m, ks in ms.items():
            cells = [f"{ks[k]['mean']:.4f} +- {ks[k]['std']:.4f}" if k in ks else "" for k in shots]
            lines.append(f"| {_NAMES.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _short(layer: str) -> str:
    """A plot label: the path up to a layer index becomes ``L<i>`` (``L3.attention.query``)."""
    parts = layer.split(".")
    for j, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join([f"L{part}"] + parts[j + 1:])
    return layer


def plot_error_ratios(results, path) -> str:
    """Grouped bars: per layer, estimation-error ratio CD / w/o CD for each K (highest sparsity)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = max(results["error_ratio"], key=float)
    ks = results["error_ratio"][s]
    layers = results["layers"]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(layers) * max(len(ks), 1) / 2 + 3), 3.5))
    width = 0.8 / max(len(ks), 1)
    x = np.arange(len(layers))
    for j, (k, ratios) in enumerate(sorted(ks.items(), key=lambda kv: int(kv[0]))):
        ax.bar(x + j * width, [ratios[lay] for lay in layers], width, label=f"K={k}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x + 0.4 - width / 2)
    ax.set_xticklabels([_short(lay) for lay in layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("error ratio CD / w/o CD")
    ax.set_title(f"per-layer estimation error at sparsity {float(s):.0%}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
