"""Cross-layer parameter sharing of a fine-tuned teacher, recovered by distillation (docs/lowrank.md).

    python train.py --config configs/sharing.py --workdir runs/sharing

1. Teacher: the fine-tuned model (``config.teacher_dir``; empty = fine-tune ``config.model_dir``
   on ``config.data`` first, as the other compression recipes do).
2. Student: a copy of the teacher whose N layers are M = ``config.sharing.num_unique`` unique
   layers placed by ``config.sharing.mode`` (``all``: ALBERT's one layer everywhere; ``sequence``,
   ``cycle``, ``cycle_rev``: Takase & Kiyono 2021); each unique layer starts as the average of the
   teacher layers mapped to it (``config.sharing.init = "average"``) or as the first of them.
3. Recovery: the distillation stages of ``config.distill.stages`` (hidden states and attention
   scores per layer, then the logits), each a `fit` of a `Distiller` in ``workdir/stage_<name>``;
   the gradient of a shared parameter is the sum over the positions that use it.
4. Output: dev metrics of the teacher and of the student before / after recovery, parameters
   (all positions and unique), stored size, ``results.json`` and the student as a HF directory
   ``workdir/student`` (every position written, so any HF tool reads it; ``sharing.json`` holds the
   assignment and `efficient_nlp.sharing.load` ties the layers again).  Sharing saves memory and
   storage, not time: every position still runs.
"""
from __future__ import annotations

import os

import numpy as np

from efficient_nlp import models, sharing
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.common import check_stages, default_dir, run_kd_stages, teacher_and_task
from efficient_nlp.recipes.outputs import save_outputs


def check_config(config):
    """Config-time validation: the assignment (N, M, mode) and every stage's matches."""
    teacher_cfg = models.config_from_pretrained(default_dir(config))
    s = config.sharing
    sharing.assignment(teacher_cfg.num_hidden_layers, int(s.num_unique), s.mode)
    if s.init not in sharing.INITS:
        raise ValueError(f"config.sharing.init={s.init!r}; use one of {sharing.INITS}")
    return check_stages(config.distill.stages, teacher_cfg, teacher_cfg, "config.distill.stages")


def run(config, workdir):
    """Shares the teacher's layers and recovers by distillation; returns the results dict."""
    train_lib.init_distributed(config)
    checked = check_config(config)
    teacher_dir, task, teacher, batches, eval_fn = teacher_and_task(config, workdir)
    s = config.sharing
    student, report = sharing.share_layers(teacher, int(s.num_unique), s.mode, init=s.init)
    print(report)
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "mode": s.mode,
               "assignment": list(report.assignment),
               "teacher": eval_fn(teacher), "student_init": eval_fn(student)}
    student, results["stages"] = run_kd_stages(student, teacher, config.distill.stages, checked,
                                               config, workdir, batches, eval_fn)
    results["student"] = eval_fn(student)
    results["size"] = {"teacher_params": sharing.param_count(teacher),
                       "student_params": sharing.param_count(student),
                       "student_unique_params": sharing.unique_param_count(student),
                       "teacher_mb": sharing.stored_nbytes(teacher) / 2 ** 20,
                       "student_mb": sharing.stored_nbytes(student) / 2 ** 20}
    out = os.path.join(workdir, "student")
    if train_lib.is_main_process():
        sharing.save(student, out)
        task.tokenizer.save_pretrained(out)
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    print(f"Student: {out} (load with efficient_nlp.sharing.load); results: {os.path.join(workdir, 'results.json')}")
    return results


def format_results(results) -> str:
    """Teacher vs shared student: dev metrics, unique parameters and stored size."""
    keys = list(results["teacher"])
    z = results["size"]
    lines = [f"Task {results['task']}: layers shared as {results['assignment']} ({results['mode']})",
             f"{'model':<22}" + "".join(f"{k:>15}" for k in keys)]
    rows = [("teacher", results["teacher"]), ("shared, untrained", results["student_init"])]
    rows += [(f"after {name}", r) for name, r in results["stages"].items()]
    for name, r in rows:
        lines.append(f"{name:<22}" + "".join(f"{r.get(k, np.nan):>15.4f}" for k in keys))
    lines.append(f"unique params: teacher {z['teacher_params']:,} / student {z['student_unique_params']:,} "
                 f"({z['student_unique_params'] / z['teacher_params']:.2f}x); stored {z['teacher_mb']:.1f} MB -> "
                 f"{z['student_mb']:.1f} MB")
    return "\n".join(lines)
