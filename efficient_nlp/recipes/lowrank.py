"""Low-rank factorisation of a fine-tuned teacher's Linears, recovered by distillation (docs/lowrank.md).

    python train.py --config configs/lowrank.py --workdir runs/lowrank
    python train.py --config configs/lowrank.py --workdir runs/fwsvd --config.lowrank.method=fwsvd

1. Teacher: the fine-tuned model (``config.teacher_dir``; empty = fine-tune ``config.model_dir`` on
   ``config.data`` first, as the other compression recipes do).
2. For each setting of ``config.lowrank.settings`` (``r<rank>``: one rank for every site;
   ``e<fraction>``: the smallest rank keeping that fraction of each kernel's squared singular
   values; ``p<fraction>`` / ``f<fraction>``: ranks chosen across sites to keep the most energy
   within that fraction of the sites' dense parameters / FLOPs; every layer Linear reads every
   token, so both budgets pick the same ranks) the Linears of the roles in
   ``config.lowrank.roles`` become two Linears ``d_in -> r -> d_out`` from the truncated SVD
   (``method``: ``svd``; ``fwsvd``, output columns of the kernel weighted by Fisher information from
   ``fisher_batches`` training batches; ``asvd``, input channels weighted by their mean absolute
   activation on ``calibration_size`` training rows).  A site whose rank would not make it smaller
   stays dense.  ``embedding_dim`` > 0 also factorises the word embedding (ALBERT).
3. Recovery: the distillation stages of ``config.distill.stages`` (hidden states and attention
   scores per layer, then the logits) in ``workdir/<setting>/stage_<name>``.
4. Output: per setting the dev metrics before / after recovery, parameters, forward time against
   the teacher (batch ``config.train.eval_batch_size``), ``results.json`` and the factorised
   student ``workdir/<setting>/student`` (`efficient_nlp.lowrank.load`).
"""
from __future__ import annotations

import os
import time

import numpy as np

from efficient_nlp import data as data_lib
from efficient_nlp import distill, lowrank, models, quant
from efficient_nlp.models import family as F
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.common import check_stages, default_dir, run_kd_stages, teacher_and_task
from efficient_nlp.recipes.finetune import task_loss
from efficient_nlp.recipes.outputs import save_outputs

_KINDS = {"r": "rank", "e": "energy", "p": "params", "f": "flops"}


def parse_setting(text: str) -> tuple[str, float]:
    """``"r64"`` -> ``("rank", 64)``, ``"e0.9"`` -> ``("energy", 0.9)``, ``"p0.5"`` -> ``("params", 0.5)``,
    ``"f0.5"`` -> ``("flops", 0.5)``."""
    text = str(text).strip()
    kind = _KINDS.get(text[:1])
    try:
        value = float(text[1:])
    except ValueError:
        kind = None
    if kind is None or (kind == "rank" and (value < 1 or value != int(value))) or (kind != "rank" and not 0 < value <= 1):
        raise ValueError(f"lowrank setting {text!r}: use r<rank> (r64), e<energy fraction> (e0.9), "
                         "p<parameter budget fraction> (p0.5) or f<FLOPs budget fraction> (f0.5)")
    return kind, (int(value) if kind == "rank" else value)


def settings(config) -> list[str]:
    names = [s.strip() for s in str(config.lowrank.settings).split(",") if s.strip()]
    if not names:
        raise ValueError("config.lowrank.settings is empty; e.g. 'r128,r64'")
    for name in names:
        parse_setting(name)
    return names


def check_config(config):
    """Config-time validation: settings, method, roles and every stage's matches."""
    names = settings(config)
    if config.lowrank.method not in lowrank.METHODS:
        raise ValueError(f"config.lowrank.method={config.lowrank.method!r}; choose from {lowrank.METHODS}")
    check_roles(_roles(config), "config.lowrank.roles")
    teacher_cfg = models.config_from_pretrained(default_dir(config))
    return names, check_stages(config.distill.stages, teacher_cfg, teacher_cfg, "config.distill.stages")


def _roles(config) -> tuple[str, ...]:
    return tuple(r.strip() for r in str(config.lowrank.roles).split(",") if r.strip())


def check_roles(roles, where: str) -> None:
    """Config-time check of comma-separated family roles (before any teacher is trained)."""
    unknown = sorted(set(roles) - set(F.LAYER_ROLES))
    if unknown or not roles:
        raise ValueError(f"{where}: unknown role(s) {unknown or 'none given'}; roles are {', '.join(F.LAYER_ROLES)}")


def _weights(config, teacher, task, batches):
    """The weights of the method: ``{"fisher": ...}`` (fwsvd), ``{"input_scales": ...}`` (asvd) or {}."""
    c = config.lowrank
    if c.method == "fwsvd":
        return {"fisher": lowrank.fisher(teacher, task_loss, batches(0), steps=int(c.fisher_batches))}
    if c.method == "asvd":
        calib, _ = quant.calibration_set(task.train, k=int(c.calibration_size), seed=config.train.seed)
        return {"input_scales": lowrank.input_scales(teacher, calib, batch_size=config.train.eval_batch_size),
                "alpha": float(c.alpha)}
    return {}


def factorized(teacher, setting: str, config, weights):
    """The teacher factorised for ``setting`` and the `LowRankReport`."""
    kind, value = parse_setting(setting)
    c = config.lowrank
    kwargs = dict(roles=_roles(config), method=c.method, **weights)
    if kind in ("params", "flops"):
        spectra, shapes = lowrank.spectra(teacher, **kwargs)
        kwargs["ranks"] = lowrank.choose_ranks(spectra, shapes, value, cost=kind)
    else:
        kwargs[kind] = value
    student, report = lowrank.factorize(teacher, **kwargs)
    if int(c.embedding_dim):
        student, _ = lowrank.factorize_embedding(student, int(c.embedding_dim))
    return student, report


def run(config, workdir):
    """Factorises and recovers the teacher for every setting; returns the results dict."""
    train_lib.init_distributed(config)
    names, checked = check_config(config)
    teacher_dir, task, teacher, batches, eval_fn = teacher_and_task(config, workdir)
    weights = _weights(config, teacher, task, batches)
    sample = next(iter(data_lib.eval_batches(task.dev, config.train.eval_batch_size)))
    teacher_seconds = distill.forward_seconds(teacher, sample)
    teacher_params = distill.num_params(teacher)
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "method": config.lowrank.method,
               "teacher": eval_fn(teacher), "teacher_params": teacher_params,
               "teacher_forward_ms": 1e3 * teacher_seconds, "settings": {}}
    for name in names:
        start = time.perf_counter()
        student, report = factorized(teacher, name, config, weights)
        print(f"[{name}] {report}")
        row = {"factorized": len(report.factorised), "params": distill.num_params(student), "student_init": eval_fn(student)}
        student, row["stages"] = run_kd_stages(student, teacher, config.distill.stages, checked, config,
                                               os.path.join(workdir, name), batches, eval_fn)
        row["seconds"] = time.perf_counter() - start
        row["student"] = eval_fn(student)
        row["params_ratio"] = row["params"] / teacher_params
        row["forward_ms"] = 1e3 * distill.forward_seconds(student, sample)
        row["speedup"] = results["teacher_forward_ms"] / row["forward_ms"]
        results["settings"][name] = row
        if train_lib.is_main_process():
            out = os.path.join(workdir, name, "student")
            lowrank.save(student, out)
            task.tokenizer.save_pretrained(out)
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    print(f"Students: {os.path.join(workdir, '<setting>', 'student')} (efficient_nlp.lowrank.load); "
          f"results: {os.path.join(workdir, 'results.json')}")
    return results


def _width(metric: str) -> int:
    return len(metric) + 7


def format_results(results) -> str:
    """Teacher and each setting: dev metrics before / after recovery, parameters, speed-up."""
    keys = list(results["teacher"])
    lines = [f"Task {results['task']}: low rank ({results['method']}); forward batch time of the teacher "
             f"{results['teacher_forward_ms']:.1f} ms",
             f"{'model':<16}" + "".join(f"{k + ' init':>{_width(k)}}{k:>{_width(k)}}" for k in keys)
             + f"{'params':>12}{'ratio':>7}{'speed-up':>9}"]
    lines.append(f"{'teacher':<16}" + "".join(f"{'':>{_width(k)}}{results['teacher'][k]:>{_width(k)}.4f}" for k in keys)
                 + f"{results['teacher_params']:>12,}{1:>7.2f}{1:>9.2f}")
    for name, r in results["settings"].items():
        lines.append(f"{name:<16}" + "".join(f"{r['student_init'].get(k, np.nan):>{_width(k)}.4f}"
                                             f"{r['student'].get(k, np.nan):>{_width(k)}.4f}" for k in keys)
                     + f"{r['params']:>12,}{r['params_ratio']:>7.2f}{r['speedup']:>9.2f}")
    return "\n".join(lines)
