"""Post-training quantization by reconstruction: REM and MREM-S (METHODS.md 1.4).

    python train.py --config configs/ptq_2_2_8.py --workdir runs/ptq_2_2_8
    python train.py --config configs/ptq_2_2_8.py --workdir runs/ptq --config.ptq.method=rem,mrem_s

1. Teacher: the fine-tuned full-precision model (``config.teacher_dir``; empty = fine-tune
   ``config.model_dir`` first into ``workdir/teacher``, as the distill / QAT recipes do).
2. Calibration: ``config.ptq.calibration_size`` rows sampled (``config.ptq.seed``) from the
   training split (`efficient_nlp.quant.ptq.calibration_set`); the rest of the split is dropped
   before anything runs, the row indices are written to ``calibration_indices.json``.
3. The fake-quantized copy of the teacher (``config.quant``, as QAT), activation quantizers
   calibrated on the first calibration batch, then for every method in ``config.ptq.method``
   (comma-separated: ``rem``, ``mrem_s``) a reconstruction starting from that same copy.
4. Output: dev metrics of the full-precision model, the quantized model before reconstruction
   and after each method (with loyalty / KL to the teacher), wall time, the per-method
   reconstruction reports, the per-layer FFN-output MSE vs full precision on the dev set
   (``layer_errors.json`` and ``layer_errors.png``), size / BOPs, ``results.json``, and each
   method's packed integer model in ``workdir/<method>/quantized``.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.quant import mrem, ptq
from efficient_nlp.quant.spec import resolve
from efficient_nlp.recipes.distill import _load_data, resolve_teacher
from efficient_nlp.recipes.outputs import save_outputs

METHODS = ("rem", "mrem_s")


def methods_of(config) -> list[str]:
    names = [m.strip() for m in str(config.ptq.method).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ValueError(f"config.ptq.method={config.ptq.method!r}: use one or more of {METHODS} "
                         "(comma-separated); mrem_p is not implemented yet")
    return names


def check_config(config):
    """Config-time validation (before any fine-tuning): methods, the spec against the model's
    sites (a rule matching nothing raises `RuleError`), the partition, the calibration size."""
    names = methods_of(config)
    spec = quant.spec_from_config(config.quant.to_dict())
    cfg = models.BertConfig.from_pretrained(config.teacher_dir or config.model_dir or models.default_model_dir())
    abstract = nnx.eval_shape(lambda: models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)))
    resolve(spec, quant.find_sites(abstract)[1])
    if "mrem_s" in names:
        ptq.partition(cfg.num_hidden_layers, int(config.ptq.mrem.num_modules))
    k = config.ptq.calibration_size
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"config.ptq.calibration_size must be a positive int, got {k!r}")
    return names, spec


def run(config, workdir):
    """Runs PTQ; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    names, spec = check_config(config)
    teacher_dir = resolve_teacher(config, workdir)
    task = _load_data(config, teacher_dir)
    teacher = models.from_pretrained(teacher_dir, num_labels=task.spec.num_labels)
    p = config.ptq
    calib, rows = ptq.calibration_set(task.train, int(p.calibration_size), seed=int(p.seed))
    train_size = len(task.train["input_ids"])
    task.train = None  # nothing below may read training rows outside the calibration set

    qmodel, report = quant.quantize_model(teacher, spec)
    print(report)
    first = {k: v[: min(int(p.batch_size), len(rows))] for k, v in calib.items()}
    quant.calibrate(qmodel, first)
    bs = config.train.eval_batch_size

    def metric_fn(predictions, labels, weights):
        return data_lib.compute_metrics(task.spec, predictions, labels, weights)

    eval_fn = distill.make_fidelity_eval_fn(task.dev, bs, metric_fn, train_lib.predict(teacher, task.dev, bs))
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "bits": spec.bits, "methods": names,
               "calibration": {"size": int(len(rows)), "train_size": int(train_size), "seed": int(p.seed)},
               "full_precision": eval_fn(teacher), "quantized_init": eval_fn(qmodel),
               "layer_errors": {"quantized_init": ptq.layer_errors(qmodel, teacher, task.dev, bs)},
               "after": {}, "wall_seconds": {}, "reports": {}}
    sample = {k: v[:1] for k, v in task.dev.items()}
    results["cost"] = {"full_precision": quant.cost_report(teacher, None, sample).summary(),
                       "quantized": quant.cost_report(teacher, spec, sample).summary()}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calibration_indices.json"), "w") as f:
        json.dump([int(i) for i in rows], f)

    for name in names:
        t0 = time.perf_counter()
        if name == "rem":
            out, rep = ptq.rem(qmodel, teacher, calib, steps=int(p.rem.steps), learning_rate=float(p.rem.learning_rate),
                               token_batch_size=int(p.rem.token_batch_size), max_tokens=int(p.rem.max_tokens),
                               eval_batch_size=bs, seed=int(p.seed))
        else:
            out, rep = mrem.mrem_s(qmodel, teacher, calib, num_modules=int(p.mrem.num_modules),
                                   steps=int(p.mrem.steps), learning_rate=float(p.mrem.learning_rate),
                                   batch_size=int(p.batch_size), eval_batch_size=bs, seed=int(p.seed))
        results["wall_seconds"][name] = time.perf_counter() - t0
        results["reports"][name] = rep
        results["after"][name] = eval_fn(out)
        results["layer_errors"][name] = ptq.layer_errors(out, teacher, task.dev, bs)
        if train_lib.is_main_process():
            out_dir = os.path.join(workdir, name, "quantized")
            quant.save_packed(quant.export_packed(out), out_dir)
            results["cost"].setdefault("packed_mb", {})[name] = quant.packed_size_mb(out_dir)

    if train_lib.is_main_process():
        with open(os.path.join(workdir, "layer_errors.json"), "w") as f:
            json.dump(results["layer_errors"], f, indent=2)
        plot_layer_errors(results["layer_errors"], os.path.join(workdir, "layer_errors.png"),
                          f"{task.spec.name}, W-E-A {spec.bits}")
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def plot_layer_errors(errors: dict, path: str, title: str = ""):
    """One line per entry of ``{label: [mse per layer]}`` (log scale) into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"quantized_init": "quantized, no reconstruction", "rem": "REM", "mrem_s": "MREM-S"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in errors.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=labels.get(key, key))
    ax.set_xlabel("Transformer layer")
    ax.set_ylabel("FFN output MSE vs full precision (dev)")
    ax.set_yscale("log")
    ax.set_title(f"Per-layer reconstruction error{': ' + title if title else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_results(results):
    """Full precision / quantized / per-method dev metrics with wall time."""
    keys = list(results["full_precision"])
    lines = [f"Task {results['task']}: PTQ W-E-A {results['bits']}, calibration "
             f"{results['calibration']['size']} of {results['calibration']['train_size']} training rows",
             f"{'model':<26}" + "".join(f"{k:>12}" for k in keys) + f"{'seconds':>10}"]
    rows = [("full precision", results["full_precision"], None),
            ("quantized, no reconstr.", results["quantized_init"], None)]
    rows += [(name, r, results["wall_seconds"][name]) for name, r in results["after"].items()]
    for name, r, sec in rows:
        lines.append(f"{name:<26}" + "".join(f"{r.get(k, np.nan):>12.4f}" for k in keys)
                     + (f"{sec:>10.1f}" if sec is not None else ""))
    return "\n".join(lines)
