"""The one place that knows how a student is matched to a teacher during training.

`Distiller` is a small NNX module holding the ``student``, the frozen ``teacher``, the learned
``projections`` of the matches that need one and a ``step`` counter (for loss-weight and
temperature schedules).  Train it with the one loop, passing `STUDENT_FILTER` as
``trainable`` so that only the student and the projections get gradients and optimizer
state; the teacher passes through the jitted step untouched (replicated and checkpointed
with the rest of the non-trainable state)::

    matches = check_matches(config_matches, student.config, teacher.config)
    model = Distiller(student, teacher, matches, rngs=nnx.Rngs(0))
    loss_fn = make_distill_loss(matches, hard_label_weight=0.0)
    model, history = train.fit(model, loss_fn, batches, config=config, workdir=workdir,
                               trainable=STUDENT_FILTER)
    student = model.student

The teacher's outputs are computed once per batch inside the jitted step (eval mode, under
``stop_gradient``), or read from ``batch["teacher_logits"]`` (`cache_teacher_logits`) when only
logits are matched, which skips the teacher forward pass entirely.
"""
from __future__ import annotations

import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.distill import losses as L
from efficient_nlp.distill.matches import (
    PROJECTABLE_LOSSES,
    REGISTERED_LOSSES,
    _width,
    captures,
    make_schedule,
    needs_intermediates,
)
from efficient_nlp.models import family as F

log = logging.getLogger(__name__)

#: ``trainable=`` filter for `fit`: every Param that is not under ``teacher``.
STUDENT_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("teacher")))


class DistillStep(nnx.Variable):
    """Counter of completed distillation updates (drives the schedules; checkpointed)."""


# ----------------------------------------------------------------------------- students
def student_from_teacher(teacher, layers, *, seed=0, **config_overrides):
    """A shallower copy of ``teacher``: embeddings, the chosen ``layers`` and the head.

    ``layers`` are teacher layer indices (0-based, distinct); student layer i starts as teacher
    layer ``layers[i]`` (DistilBERT / PKD initialisation; the layers are taken with
    `efficient_nlp.models.family.resized`, so any model family works).  ``config_overrides``
    change non-shape fields (e.g. dropout).  Returns a new module of the teacher's class;
    ``seed`` initialises it before every parameter is overwritten by the teacher's.
    """
    n = teacher.config.num_hidden_layers
    layers = tuple(layers)
    if not layers or any(not isinstance(i, int) or not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"student layers must be distinct teacher layer indices in 0..{n - 1}, got {layers}")
    small = F.resized(teacher, layers=list(layers))
    per_layer = any(getattr(teacher.config, k, None) is not None for k in
                    ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"))
    # a pruned teacher's per-layer head counts / widths follow the kept layers
    config = small.config if per_layer else teacher.config.replace(num_hidden_layers=len(layers))
    student = type(teacher)(config.replace(**config_overrides), rngs=nnx.Rngs(seed))
    nnx.update(student, nnx.state(small, nnx.Param))
    return student


# ----------------------------------------------------------------------------- the module
class Distiller(nnx.Module):
    """student + frozen teacher + learned projections (one per projected match) + step counter."""

    def __init__(self, student, teacher, matches, *, rngs: nnx.Rngs):
        self.student = student
        self.teacher = teacher
        projections = []
        for m in matches:
            if m.projection:
                ws, wt = _width(m.feature, student.config), _width(m.feature, teacher.config)
                projections.append(nnx.Linear(ws, wt, rngs=rngs))
        self.projections = nnx.List(projections)
        self.step = DistillStep(jnp.zeros((), jnp.int32))


def _heads(x, head_dim):
    b, t, w = x.shape
    return x.reshape(b, t, w // head_dim, head_dim).transpose(0, 2, 1, 3)


def feature_of(model, out, feature, layer):
    """The tensor of ``feature`` at ``layer`` from a model's output (with the captures of `captures`)."""
    if feature == "logits":
        return out.logits
    if feature == "embedding":
        return out.intermediates["embedding"]
    if feature == "hidden":
        return out.intermediates["hidden_states"][layer]
    if feature in ("queries", "keys"):   # the layer's q / k projection of its input (MiniLMv2)
        role = "q" if feature == "queries" else "k"
        dense = F.get_module(model, F.site_path(model, layer, role))
        x = out.intermediates[F.site_input(model, role)][layer]
        return _heads(dense(x), model.config.attention_head_dim)
    return out.intermediates[feature][layer]


def match_loss(m, student_value, teacher_value, mask, *, temperature=1.0, projection=None):
    """The value of one `Match`'s loss (before its weight) on the two features."""
    per_token = mask if student_value.ndim == 3 and m.feature == "logits" else None  # a decoder: [B,T,V]
    if m.loss in ("soft_ce", "kl"):
        fn = L.soft_cross_entropy if m.loss == "soft_ce" else L.kl_divergence
        return fn(student_value, teacher_value, temperature, t2_scale=m.t2_scale, mask=per_token)
    if m.loss == "logits_mse":
        return L.logits_mse(student_value, teacher_value, mask=per_token)
    if m.loss in PROJECTABLE_LOSSES:
        kernel = bias = None
        if projection is not None:
            kernel, bias = projection.kernel[...], projection.bias[...]
        fn = {"hidden_mse": L.hidden_mse, "cosine": L.cosine_embedding_loss, "pkd": L.pkd_loss}[m.loss]
        return fn(student_value, teacher_value, mask, kernel=kernel, bias=bias)
    if m.loss == "attention_mse":
        return L.attention_mse(student_value, teacher_value, mask)
    if m.loss == "attention_kl":
        return L.attention_kl(student_value, teacher_value, mask, from_scores=m.feature == "attn_scores")
    if m.loss == "value_relation_kl":
        return L.value_relation_kl(student_value, teacher_value, mask)
    if m.loss == "relation_kl":
        return L.relation_kl(student_value, teacher_value, mask, num_relation_heads=m.relation_heads)
    if m.loss in REGISTERED_LOSSES:
        return REGISTERED_LOSSES[m.loss](student_value, teacher_value, mask)
    raise ValueError(f"unknown loss {m.loss!r}")


def make_distill_loss(matches, *, hard_label_weight=0.0):
    """``loss_fn(model: Distiller, batch, rngs) -> (loss, aux)`` for `efficient_nlp.train.fit`.

    ``loss = sum_m weight_m(step) * loss_m + hard_label_weight(step) * task_loss``; ``matches``
    come from `check_matches` (already validated), ``hard_label_weight`` is a schedule spec.
    For a decoder (logits [B,T,V]) logits matches are per token (mean over valid tokens) and the
    task loss is the next-token cross-entropy (`losses.next_token_loss`; no ``labels`` needed).
    ``aux`` holds each match's unweighted loss as ``distill/<label>`` and ``hard_loss``.
    The student runs in training mode (dropout); the teacher in eval mode.
    """
    matches = tuple(matches)
    weights = [make_schedule(m.weight) for m in matches]
    temps = [make_schedule(m.temperature) for m in matches]
    hard_weight = make_schedule(hard_label_weight)
    capture = captures(matches, "student")
    teacher_intermediates = needs_intermediates(matches)
    logits_matched = any(m.feature == "logits" for m in matches)
    use_hard = not (isinstance(hard_label_weight, (int, float)) and hard_label_weight == 0)

    def loss_fn(model, batch, rngs):
        step = model.step[...]
        model.step[...] = step + 1
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        s_out = model.student(ids, mask, types, capture=capture, deterministic=False, rngs=rngs)
        if teacher_intermediates or (logits_matched and "teacher_logits" not in batch):
            t_out = model.teacher(ids, mask, types, capture=capture)
            t_out = jax.lax.stop_gradient(t_out)
        else:
            t_out = None
        total = jnp.zeros((), jnp.float32)
        aux = {}
        proj = iter(model.projections)
        for m, weight, temp in zip(matches, weights, temps):
            projection = next(proj) if m.projection else None
            s_val = feature_of(model.student, s_out, m.feature, m.student_layer)
            if m.feature == "logits" and t_out is None:
                t_val = jnp.asarray(batch["teacher_logits"], jnp.float32)
            else:
                t_val = jax.lax.stop_gradient(feature_of(model.teacher, t_out, m.feature, m.teacher_layer))
            value = match_loss(m, s_val, t_val, mask, temperature=temp(step), projection=projection)
            aux[f"distill/{m.label}"] = value
            total = total + weight(step) * value
        causal = s_out.logits is not None and s_out.logits.ndim == 3
        if causal:
            hard, aux["token_accuracy"] = L.next_token_loss(s_out.logits, ids, mask)
        if use_hard:
            if not causal:
                hard = L.hard_label_loss(s_out.logits, batch["labels"], batch.get("label_weights"))
            aux["hard_loss"] = hard
            total = total + hard_weight(step) * hard
        if not causal and s_out.logits is not None and s_out.logits.shape[-1] > 1:
            correct = (jnp.argmax(s_out.logits, -1) == batch["labels"]).astype(jnp.float32)
            w = batch.get("label_weights")   # transfer set: the accuracy of the labelled rows only
            aux["accuracy"] = jnp.mean(correct) if w is None else jnp.sum(w * correct) / jnp.maximum(jnp.sum(w), 1.0)
        return total, aux

    return loss_fn


# ----------------------------------------------------------------------------- teacher cache
def _fingerprint(arrays):
    h = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def cache_teacher_logits(teacher, arrays, batch_size, path):
    """The teacher's logits on every row of ``arrays`` (float32 [N, C]), cached in ``path`` (.npz).

    A cache whose fingerprint (a hash of the token arrays) differs is recomputed.  Put the
    result into the training arrays as ``teacher_logits``: `make_distill_loss` then skips the
    teacher forward pass when only logits are matched.
    """
    from efficient_nlp.train import is_main_process, predict

    key = _fingerprint(arrays)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["fingerprint"]) == key:
                return np.asarray(f["logits"], np.float32)
        log.info("teacher logits cache %s is for other data; recomputing", path)
    logits = np.asarray(predict(teacher, arrays, batch_size), np.float32)
    if is_main_process():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, logits=logits, fingerprint=np.asarray(key))
        os.replace(tmp, path)
    return logits
