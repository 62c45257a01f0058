"""Fidelity of a student to its teacher (docs/distillation.md, "Fidelity"), and size / speed.

``loyalty`` is the fraction of examples where the student predicts the teacher's class;
``mean_kl`` the mean KL(teacher || student) of their output distributions.  Both are logged
next to the task metric by `make_fidelity_eval_fn`.
"""
from __future__ import annotations

import numpy as np

from efficient_nlp.distill import losses as L


def loyalty(student_logits, teacher_logits) -> float:
    """Teacher-student agreement: mean of ``argmax z_s == argmax z_t`` (regression: 1 - |diff| is
    not defined, so for one output it is the fraction within 0.5 of the teacher)."""
    s, t = np.asarray(student_logits), np.asarray(teacher_logits)
    if s.shape[-1] == 1:
        return float(np.mean(np.abs(s[..., 0] - t[..., 0]) < 0.5))
    return float(np.mean(np.argmax(s, -1) == np.argmax(t, -1)))


def mean_kl(student_logits, teacher_logits) -> float:
    """Mean KL(p_teacher || p_student) at T = 1 (MSE of the outputs for regression)."""
    s, t = np.asarray(student_logits, np.float32), np.asarray(teacher_logits, np.float32)
    if s.shape[-1] == 1:
        return float(np.mean((s - t) ** 2))
    return float(L.kl_divergence(s, t))


def fidelity_metrics(student_logits, teacher_logits) -> dict[str, float]:
    return {"loyalty": loyalty(student_logits, teacher_logits),
            "teacher_kl": mean_kl(student_logits, teacher_logits)}


def student_of(model):
    """The student inside a `Distiller` / `TheseusModel`, or the model itself."""
    return getattr(model, "student", model)


def make_fidelity_eval_fn(arrays, batch_size, metric_fn, teacher_logits):
    """``eval_fn(model) -> dict``: the task metrics of ``metric_fn(predictions, labels, None)``
    plus ``loyalty`` and ``teacher_kl`` against the precomputed ``teacher_logits`` of ``arrays``.

    ``model`` may be a `Distiller` (its student is evaluated) or a plain model.
    """
    from efficient_nlp.train import predict

    labels = np.asarray(arrays["labels"])
    teacher_logits = np.asarray(teacher_logits)

    def eval_fn(model):
        logits = predict(student_of(model), arrays, batch_size)
        results = {k: float(v) for k, v in metric_fn(logits, labels, None).items()}
        results.update(fidelity_metrics(logits, teacher_logits))
        return results

    return eval_fn


def num_params(model) -> int:
    """Number of parameters (``nnx.Param`` leaves) of a model: `efficient_nlp.train.count_params`."""
    from efficient_nlp import train

    return train.count_params(model)


def forward_seconds(model, batch, *, repeats=5) -> float:
    """Median wall time of the jitted eval-mode forward pass on ``batch`` (after one warm-up):
    `efficient_nlp.train.measure_latency`."""
    from efficient_nlp import train

    return train.measure_latency(model, batch, repeats=repeats, warmup=1)
