"""Distillation recipe: a fine-tuned teacher into a shallower student initialised from its layers.

    python train.py --config configs/distill_two_stage.py --workdir runs/distill

1. Teacher: ``config.teacher_dir`` (a HF directory written by the finetune recipe's
   ``workdir/model``); empty means "fine-tune ``config.model_dir`` on ``config.data`` first"
   with ``config.teacher_train`` into ``workdir/teacher`` (reused when already there; about
   10 minutes on 2 CPU cores for the embedded MiniLM on the built-in task).
2. Student: embeddings, encoder layers ``config.student.layers`` and the classification head copied
   (`efficient_nlp.distill.student_from_teacher`) from the fine-tuned teacher
   (``config.student.init == "teacher"``) or from the pretrained model the teacher was
   fine-tuned from (``"pretrained"``: ``config.model_dir`` or the embedded MiniLM, with a freshly
   initialised classifier; the PKD / DistilBERT task-specific setting).  The baseline of 4.
   starts from the same student.
3. ``config.distill.method == "kd"``: stages run one after another, each a `fit` of a
   `Distiller` with its own matches, steps and learning rate in ``workdir/stage_<name>``
   (two-stage: intermediate matches, then the prediction layer; one-stage: all at once).
   ``"theseus"``: BERT-of-Theseus module replacing in ``workdir/theseus``.
4. Optionally (``config.baseline.enabled``) the same student trained on the task loss only.

Transfer set (``config.distill.labelled_examples = N > 0``): only N training examples (a seeded
random subset, `labelled_subset`) keep their labels.  The student is distilled on every training
text, the teacher's outputs being the only targets on the others (Hinton et al. 2015's transfer
set; Turc et al. 2019 distil on unlabelled in-domain text); the hard-label loss counts the N
labelled rows only, and the baseline trains on those N.  The teacher is taken as given.

Prints teacher / student / baseline dev metrics (with loyalty and KL to the teacher), parameter
counts and the student's forward-pass speed-up; writes ``results.json`` and the student as a
HF directory ``workdir/student``.  All match configs are checked before any training.
"""
from __future__ import annotations

import os

import numpy as np

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.common import (check_stages, default_dir, final_eval, load_data, resolve_teacher, run_kd_stages,
                                          stage_config)
from efficient_nlp.recipes.common import teacher_and_task  # noqa: F401  (importable from here as before)
from efficient_nlp.recipes.outputs import save_outputs


def _teacher_config_dir(config):
    return default_dir(config)


def check_config(config):
    """Config-time validation of every stage's matches (layer indices, features, losses)."""
    teacher_cfg = models.config_from_pretrained(_teacher_config_dir(config))
    layers = tuple(config.student.layers)
    if any(not isinstance(i, int) or not 0 <= i < teacher_cfg.num_hidden_layers for i in layers):
        raise ValueError(f"config.student.layers={layers}: teacher layers are 0.."
                         f"{teacher_cfg.num_hidden_layers - 1}")
    _student_init(config)
    student_cfg = teacher_cfg.replace(num_hidden_layers=len(layers))
    method = config.distill.method
    n_labelled = int(config.distill.get("labelled_examples", 0))
    if n_labelled < 0:
        raise ValueError(f"config.distill.labelled_examples={n_labelled}: use 0 (every example labelled) or N > 0")
    if method == "theseus":
        if n_labelled:
            raise ValueError("config.distill.labelled_examples needs method='kd': module replacing "
                             "(theseus) has no teacher targets for unlabelled texts")
        distill.theseus_blocks(teacher_cfg.num_hidden_layers, len(layers))
        distill.check_schedule(config.distill.replace_rate, "config.distill.replace_rate")
        return {}
    if method != "kd":
        raise ValueError(f"config.distill.method={method!r}; use 'kd' or 'theseus'")
    return check_stages(config.distill.stages, student_cfg, teacher_cfg, "config.distill.stages")


STUDENT_INITS = ("teacher", "pretrained")


def _student_init(config):
    init = config.student.get("init", "teacher")
    if init not in STUDENT_INITS:
        raise ValueError(f"config.student.init={init!r}; valid: {STUDENT_INITS}")
    return init


def _student_source(config, teacher, num_labels):
    """The model whose layers the student copies (see the module docstring, 2.)."""
    if _student_init(config) == "teacher":
        return teacher
    return models.from_pretrained(config.model_dir or default_dir(config), num_labels=num_labels,
                                  seed=config.train.seed)


def labelled_subset(num_rows: int, num_labelled: int, seed: int) -> np.ndarray:
    """Sorted indices of the ``num_labelled`` training rows that keep their labels (seeded)."""
    if not 0 < num_labelled <= num_rows:
        raise ValueError(f"config.distill.labelled_examples={num_labelled}: the training split has "
                         f"{num_rows} examples; use 1..{num_rows} (0: every example labelled)")
    return np.sort(np.random.default_rng(seed).permutation(num_rows)[:num_labelled])


def run(config, workdir):
    """Distils the teacher into the student; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    checked = check_config(config)
    teacher_dir = resolve_teacher(config, workdir)
    task = load_data(config, teacher_dir)
    spec = task.spec
    teacher = models.from_pretrained(teacher_dir, num_labels=spec.num_labels)
    student0 = distill.student_from_teacher(_student_source(config, teacher, spec.num_labels),
                                            tuple(config.student.layers), seed=config.train.seed,
                                            **config.student.overrides.to_dict())
    bs = config.train.eval_batch_size

    def metric_fn(predictions, labels, weights):
        return data_lib.compute_metrics(spec, predictions, labels, weights)

    teacher_dev = train_lib.predict(teacher, task.dev, bs)
    eval_fn = distill.make_fidelity_eval_fn(task.dev, bs, metric_fn, teacher_dev)
    results = {"task": spec.name, "teacher_dir": teacher_dir, "method": config.distill.method,
               "student_layers": list(config.student.layers),
               "teacher": eval_fn(teacher), "student_init": eval_fn(student0), "stages": {}}

    train, labelled = dict(task.train), dict(task.train)
    n_labelled = int(config.distill.get("labelled_examples", 0))
    if n_labelled:
        rows = labelled_subset(len(task.train["labels"]), n_labelled, config.train.seed)
        labelled = {k: v[rows] for k, v in task.train.items()}
        train["label_weights"] = np.zeros(len(task.train["labels"]), np.float32)
        train["label_weights"][rows] = 1.0
        results["transfer_set"] = {"labelled": n_labelled, "texts": int(len(task.train["labels"]))}
    if config.distill.cache_teacher_logits:
        train["teacher_logits"] = distill.cache_teacher_logits(
            teacher, task.train, bs, os.path.join(workdir, "teacher_logits.npz"))

    def batches(start_step, arrays=train):
        return data_lib.train_batches(arrays, config.train.batch_size, seed=config.train.seed,
                                      start_step=start_step)

    student, total_steps, last_lr = student0, 0, config.train.learning_rate
    if config.distill.method == "theseus":
        model = distill.TheseusModel(student, teacher)
        model, history = train_lib.fit(
            model, distill.make_theseus_loss(config.distill.replace_rate), batches, config=config,
            workdir=os.path.join(workdir, "theseus"), eval_fn=eval_fn, trainable=distill.STUDENT_FILTER)
        student, total_steps = model.student, config.train.num_steps
        results["stages"]["theseus"] = final_eval(history)
    else:
        student, results["stages"] = run_kd_stages(student, teacher, config.distill.stages, checked,
                                                   config, workdir, batches, eval_fn)
        total_steps = sum(int(stage["num_steps"]) for stage in config.distill.stages)
        last_lr = config.distill.stages[-1]["learning_rate"]
    results["student"] = eval_fn(student)

    if config.baseline.enabled:
        from efficient_nlp.recipes.finetune import task_loss
        base_cfg = stage_config(config, config.baseline.num_steps or total_steps,
                                 config.baseline.learning_rate or last_lr)
        base, history = train_lib.fit(student0, task_loss, lambda start: batches(start, labelled), config=base_cfg,
                                      workdir=os.path.join(workdir, "baseline"), eval_fn=eval_fn)
        results["baseline"] = final_eval(history)

    sample = next(iter(data_lib.eval_batches(task.dev, bs)))
    t_time = distill.forward_seconds(teacher, sample)
    s_time = distill.forward_seconds(student, sample)
    results["size"] = {"teacher_params": distill.num_params(teacher),
                       "student_params": distill.num_params(student),
                       "teacher_forward_ms": 1e3 * t_time, "student_forward_ms": 1e3 * s_time,
                       "speedup": t_time / s_time, "forward_batch": int(bs)}
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {"student": student})
    return results


def format_results(results):
    """Teacher / student (/ baseline) dev metrics, sizes and speed-up as a small table."""
    rows = [("teacher", results["teacher"]), ("student init", results["student_init"])]
    rows += [(f"after {name}", r) for name, r in results["stages"].items()]
    if "baseline" in results:
        rows.append(("no distillation", results["baseline"]))
    keys = list(results["teacher"])
    lines = [f"Task {results['task']}: {results['method']} into layers {results['student_layers']}"
             + (" (transfer set: {labelled} of {texts} texts labelled; baseline on those)".format(
                 **results["transfer_set"]) if "transfer_set" in results else ""),
             f"{'model':<20}" + "".join(f"{k:>15}" for k in keys)]
    for name, r in rows:
        lines.append(f"{name:<20}" + "".join(f"{r.get(k, np.nan):>15.4f}" for k in keys))
    s = results["size"]
    lines.append(f"params: teacher {s['teacher_params']:,} / student {s['student_params']:,} "
                 f"({s['student_params'] / s['teacher_params']:.2f}x)")
    lines.append(f"forward (batch {s['forward_batch']}): teacher {s['teacher_forward_ms']:.1f} ms, "
                 f"student {s['student_forward_ms']:.1f} ms, speed-up {s['speedup']:.2f}x")
    return "\n".join(lines)
