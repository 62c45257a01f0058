"""Set-up shared by the recipes that compress a fine-tuned teacher (distill, qat, ptq, binarybert,
binarybert_adaptive, cross_distill): the teacher (given, or fine-tuned first), the task data of
``config.data``, config-time checks of distillation stages and the stage-by-stage KD loop.
"""
from __future__ import annotations

import os

import ml_collections
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import train as train_lib


def is_lm(config) -> bool:
    """The recipe runs on causal language modelling (``config.data.task == "lm"``, a decoder)."""
    return config.data.get("task") == "lm"


def default_dir(config) -> str:
    """The teacher's directory as configured, else the bundled default model of the task kind
    (the pre-trained decoder for ``lm``, MiniLM otherwise)."""
    return (config.get("teacher_dir") or config.model_dir
            or (models.default_decoder_dir() if is_lm(config) else models.default_model_dir()))


def resolve_teacher(config, workdir):
    """``config.teacher_dir``, or a teacher fine-tuned now into ``workdir/teacher/model``; for
    causal language modelling the pretrained decoder itself (``model_dir`` or the default)."""
    if config.teacher_dir:
        return config.teacher_dir
    if is_lm(config):
        return default_dir(config)
    from efficient_nlp.recipes import finetune

    teacher_work = os.path.join(workdir, "teacher")
    model_dir = os.path.join(teacher_work, "model")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        ft = ml_collections.ConfigDict(dict(
            recipe="finetune", model_dir=config.model_dir,
            model=dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
            data=config.data.to_dict(), train=config.teacher_train.to_dict(),
            distributed=config.distributed.to_dict()))
        print("Fine-tuning the teacher first (config.teacher_dir is empty) ...")
        finetune.run(ft, teacher_work)
    return model_dir


def load_data(config, tokenizer_dir):
    """The task of ``config.data`` tokenised with the tokenizer in ``tokenizer_dir`` (``task="lm"``:
    packed blocks of ``max_length`` tokens of ``data.source``, `efficient_nlp.data.load_lm_task`).

    A model directory saved by the fine-tuning recipe holds the data settings it was trained with
    (``efficient_nlp_data.json``): when ``config.data`` names no data of its own (its source keys at
    their defaults), those settings are used, and ``config.data`` is updated in place so that later
    reads (``max_length``) agree (`efficient_nlp.data.merge_data_settings`, docs/your_data.md)."""
    label_names = None if is_lm(config) else reuse_saved_data(config, tokenizer_dir)
    task = _load(config, tokenizer_dir, label_names)
    _say(describe_data(task, config.data.max_length, "blocks" if is_lm(config) else "examples"))
    return task


def reuse_saved_data(config, model_dir):
    """Fills ``config.data`` from ``model_dir``'s saved data settings when it names no data of its
    own; returns the saved class names (or None)."""
    saved = data_lib.load_data_settings(model_dir)
    if saved is None:
        return None
    path = os.path.join(model_dir, data_lib.settings.SETTINGS_FILE)
    merged = data_lib.merge_data_settings(config.data.to_dict(), data_lib.default_data_config(), saved)
    label_names = merged.pop("label_names")
    changed = {k: v for k, v in merged.items() if k in config.data and config.data[k] != v}
    if changed:
        config.data.update(changed)
        _say(f"data: the settings saved with the model ({path}): "
             + ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())))
    elif config.data.task != saved.get("task"):
        _say(f"data: config.data names its own data (task {config.data.task!r}); the model was "
             f"fine-tuned on task {saved.get('task')!r} ({path})")
    return label_names


def _say(text):
    if train_lib.is_main_process():
        print(text)


def describe_data(task, max_length, unit="examples") -> str:
    """One line: the task, its split sizes and the sequence length."""
    def size(split):
        return "no" if split is None else str(len(split["input_ids"]))
    return (f"data: {task.spec.name}, {size(task.train)} train / {size(task.dev)} dev {unit} "
            f"of up to {max_length} tokens")


def _load(config, tokenizer_dir, label_names=None):
    d = config.data
    if is_lm(config):
        return data_lib.load_lm_task(tokenizer_dir, source=d.get("source") or "builtin",
                                     validation=d.get("validation", ""), block_size=d.max_length,
                                     max_documents=d.get("max_documents", 0), eval_blocks=d.get("eval_blocks", 64),
                                     max_train_blocks=d.max_train_examples)
    return data_lib.load_task_data(
        d.task, tokenizer_dir=tokenizer_dir, max_length=d.max_length,
        data_dir=d.data_dir or None, train_file=d.train_file or None,
        dev_file=d.dev_file or None, text_a=d.text_a or None, text_b=d.text_b or None,
        label=d.label or None, num_labels=d.num_labels or None, label_names=label_names,
        max_train_examples=d.max_train_examples or None)


def teacher_and_task(config, workdir):
    """The shared set-up of the recipes that compress a fine-tuned teacher (qat, binarybert,
    binarybert_adaptive): ``(teacher_dir, task, teacher, batches, eval_fn)`` with ``batches(start)``
    the seeded training batches and ``eval_fn(model)`` the dev metrics plus loyalty / KL to the
    teacher."""
    teacher_dir = resolve_teacher(config, workdir)
    task = load_data(config, teacher_dir)
    teacher = models.from_pretrained(teacher_dir, num_labels=task.spec.num_labels)

    def batches(start_step):
        return data_lib.train_batches(task.train, config.train.batch_size, seed=config.train.seed,
                                      start_step=start_step)

    def metric_fn(predictions, labels, weights):
        return data_lib.compute_metrics(task.spec, predictions, labels, weights)

    bs = config.train.eval_batch_size
    eval_fn = distill.make_fidelity_eval_fn(task.dev, bs, metric_fn, train_lib.predict(teacher, task.dev, bs))
    return teacher_dir, task, teacher, batches, eval_fn


def check_stages(stages, student_cfg, teacher_cfg, where):
    """``{stage name: checked matches}``; any bad match or schedule raises naming the stage."""
    checked = {}
    for stage in stages:
        name = stage["name"]
        try:
            checked[name] = distill.check_matches(stage["matches"], student_cfg, teacher_cfg)
            distill.check_schedule(stage.get("hard_label_weight", 0.0), "hard_label_weight")
        except ValueError as e:
            raise ValueError(f"{where}[{name!r}]: {e}") from None
    if not checked:
        raise ValueError(f"{where} is empty")
    return checked


def stage_config(config, num_steps, learning_rate):
    """A copy of ``config`` whose ``train`` runs ``num_steps`` at ``learning_rate``."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.num_steps = int(num_steps)
    c.train.learning_rate = float(learning_rate)
    return c


def final_eval(history):
    """The last evaluation of a `fit` history, without the ``eval/`` prefix."""
    return {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}


def run_kd_stages(student, teacher, stages, checked, config, workdir, batches, eval_fn):
    """Runs the distillation ``stages`` one after another (each a `fit` of a `Distiller` in
    ``workdir/stage_<name>``); returns ``(student, {stage name: final eval metrics})``."""
    out = {}
    for stage in stages:
        matches = checked[stage["name"]]
        cfg = stage_config(config, stage["num_steps"], stage["learning_rate"])
        model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(config.train.seed))
        loss_fn = distill.make_distill_loss(matches, hard_label_weight=stage.get("hard_label_weight", 0.0))
        model, history = train_lib.fit(
            model, loss_fn, batches, config=cfg,
            workdir=os.path.join(workdir, f"stage_{stage['name']}"), eval_fn=eval_fn,
            trainable=distill.STUDENT_FILTER)
        student = model.student
        out[stage["name"]] = final_eval(history)
    return student, out
