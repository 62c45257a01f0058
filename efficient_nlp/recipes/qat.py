"""Quantization-aware training with two-stage distillation (TernaryBERT, Zhang et al. 2020; docs/quantization.md).

    python train.py --config configs/qat_2_2_8.py --workdir runs/qat_2_2_8

1. Teacher: the fine-tuned full-precision model (``config.teacher_dir``; empty = fine-tune
   ``config.model_dir`` on ``config.data`` first, as the distill recipe does).
2. Student: a copy of the teacher, fake-quantized by ``config.quant`` (W-E-A bits, methods,
   rules; `efficient_nlp.quant.spec_from_config`); learned activation quantizers are
   calibrated on one training batch.  The quantization report is printed.
3. Stages (``config.distill.stages``), each a `fit` of a `Distiller`: intermediate-layer
   distillation (embedding, MHA outputs, FFN outputs, attention scores), then prediction-layer
   distillation (soft cross-entropy, T = 1).  Latent float weights and learned step sizes train.
4. Output: dev metrics of the teacher, of the quantized student before and after training,
   parameters / stored size / FLOPs / BOPs next to full precision, ``results.json``, the
   packed integer artefact ``workdir/quantized`` (its file size is the size reported as
   ``packed_mb``).
"""
from __future__ import annotations

import os

import numpy as np

from efficient_nlp import models
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.common import check_stages, default_dir, run_kd_stages, teacher_and_task
from efficient_nlp.recipes.outputs import deployed_quantized, latency_ms, report_to_file, save_outputs


def check_config(config):
    """Config-time validation: the spec and every stage's matches (same-architecture student)."""
    spec = quant.spec_from_config(config.quant.to_dict())
    teacher_cfg = models.config_from_pretrained(default_dir(config))
    return spec, check_stages(config.distill.stages, teacher_cfg, teacher_cfg, "config.distill.stages")


def quantized_student(teacher, spec, calibration_batch):
    """A fake-quantized copy of ``teacher`` (calibrated) and its `QuantReport`."""
    student, report = quant.quantize_model(teacher, spec)
    quant.calibrate(student, calibration_batch)
    return student, report


def run(config, workdir):
    """Runs QAT; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    spec, checked = check_config(config)
    teacher_dir, task, teacher, batches, eval_fn = teacher_and_task(config, workdir)
    student, report = quantized_student(teacher, spec, next(batches(0)))
    report_to_file(workdir, "quant_report.txt", report)
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "bits": spec.bits,
               "teacher": eval_fn(teacher), "student_init": eval_fn(student)}
    student, results["stages"] = run_kd_stages(student, teacher, config.distill.stages, checked,
                                               config, workdir, batches, eval_fn)
    results["student"] = eval_fn(student)

    sample = {k: v[:1] for k, v in task.dev.items()}
    results["cost"] = {"full_precision": quant.cost_report(teacher, None, sample).summary(),
                       "quantized": quant.cost_report(teacher, spec, sample).summary()}
    out_dir = os.path.join(workdir, "quantized")
    quant.save_packed(quant.export_packed(student), out_dir)
    results["cost"]["quantized"]["packed_mb"] = quant.packed_size_mb(out_dir)
    deployed, how = deployed_quantized(student)
    seq = config.data.max_length
    results["latency_ms"] = {"full_precision": latency_ms(teacher, seq), "quantized": latency_ms(deployed, seq),
                             "note": f"median ms of one forward, batch 1 x {seq} tokens, this machine; "
                                     f"quantized model run as {how}"}
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def format_results(results):
    """Teacher vs quantized student: dev metrics, size and BOPs."""
    keys = list(results["teacher"])
    fp, q = results["cost"]["full_precision"], results["cost"]["quantized"]
    lines = [f"Task {results['task']}: QAT W-E-A {results['bits']}",
             f"{'model':<22}" + "".join(f"{k:>15}" for k in keys) + f"{'size MB':>10}{'BOPs G':>10}{'ms':>8}"]
    lat = results.get("latency_ms", {})
    stages = list(results["stages"])
    rows = [("full precision", results["teacher"], fp, lat.get("full_precision")),
            ("quantized, untrained", results["student_init"], q, None)]
    rows += [(f"after {name}", r, q, lat.get("quantized") if name == stages[-1] else None)
             for name, r in results["stages"].items()]
    for name, r, c, ms in rows:
        lines.append(f"{name:<22}" + "".join(f"{r.get(k, np.nan):>15.4f}" for k in keys)
                     + f"{c['size_mb']:>10.2f}{c['bops'] / 1e9:>10.3f}" + (f"{ms:>8.1f}" if ms is not None else ""))
    if "packed_mb" in q:
        lines.append(f"packed artefact: {q['packed_mb']:.2f} MB on disk (full precision {fp['size_mb']:.2f} MB)")
    if lat:
        lines.append(f"ms: {lat['note']}")
    return "\n".join(lines)
