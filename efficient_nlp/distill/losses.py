"""Distillation losses: pure, jit-able functions ``fn(student, teacher, ...) -> scalar``.

Every function takes the student's tensor first and the teacher's second (the teacher is
treated as a constant: wrap it in ``jax.lax.stop_gradient`` or compute it outside the
differentiated function).  Inputs of any float dtype (bfloat16 activations of a mixed-precision
model) are upcast: every loss is computed and returned in float32.  Methods: docs/distillation.md.

Reductions (one convention everywhere):

* logits losses sum over the class axis and take the mean over all other axes;
* token losses (hidden states, cosine) average over the valid tokens of ``mask`` [B,T]
  (1 = token, 0 = padding) and, for MSE, over the features;
* attention losses on [B,N,T,T] average over batch, heads and valid *query* positions;
  padded *keys* are excluded: MSE ignores them, KL renormalises the distributions over the
  valid keys only.

The ``T^2`` factor (Hinton et al.) is applied only when asked (``t2_scale=True``): it keeps the
soft-target gradient scale independent of ``T`` when mixed with a hard-label loss.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: Additive bias for masked keys (same value as the model's; finite so 0 * bias == 0).
MASK_VALUE = 0.5 * float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------- helpers
def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _masked_mean(values, weights):
    """sum(values * weights) / sum(weights); weights broadcast against values."""
    weights = jnp.broadcast_to(_f32(weights), values.shape)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _lead_mean(values, mask):
    """Mean of ``values`` (shape = leading axes) over entries where ``mask`` is 1 (all if None)."""
    if mask is None:
        return jnp.mean(values)
    return _masked_mean(values, mask)


def _key_bias(mask, ndim):
    """[B,T] mask -> additive bias broadcasting over [B,(N,)T_query,T_key]."""
    bias = jnp.where(_f32(mask) > 0, 0.0, MASK_VALUE)
    return bias.reshape(bias.shape[:1] + (1,) * (ndim - 2) + bias.shape[1:])


def _query_weights(mask, ndim):
    """[B,T] mask -> weights broadcasting over [B,(N,)T_query] (the KL's leading axes)."""
    m = _f32(mask)
    return m.reshape(m.shape[:1] + (1,) * (ndim - 3) + m.shape[1:])


# ----------------------------------------------------------------------------- logits
def soft_cross_entropy(student_logits, teacher_logits, temperature=1.0, *, t2_scale=False, mask=None):
    """Hinton soft cross-entropy (Hinton et al. 2015).

    ``-sum_c softmax(z_t / T)_c * log_softmax(z_s / T)_c``, summed over the last (class) axis,
    averaged over the other axes (over ``mask``-selected rows when given), times ``T^2``
    when ``t2_scale``.  No ``T^2`` factor by default.
    """
    t = jnp.asarray(temperature, jnp.float32)
    p_t = jax.nn.softmax(_f32(teacher_logits) / t, axis=-1)
    log_p_s = jax.nn.log_softmax(_f32(student_logits) / t, axis=-1)
    loss = _lead_mean(-jnp.sum(p_t * log_p_s, axis=-1), mask)
    return loss * t * t if t2_scale else loss


def kl_divergence(student_logits, teacher_logits, temperature=1.0, *, t2_scale=False, mask=None):
    """KL(p_teacher || p_student) at temperature T (Hinton et al. 2015).

    ``sum_c p_t,c (log p_t,c - log p_s,c)`` with ``p = softmax(z / T)``; same reduction as
    `soft_cross_entropy` (which it equals minus the teacher's entropy, so the gradients match).
    """
    t = jnp.asarray(temperature, jnp.float32)
    log_p_t = jax.nn.log_softmax(_f32(teacher_logits) / t, axis=-1)
    log_p_s = jax.nn.log_softmax(_f32(student_logits) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    loss = _lead_mean(kl, mask)
    return loss * t * t if t2_scale else loss


def logits_mse(student_logits, teacher_logits, *, mask=None):
    """Mean squared error between logits (docs/distillation.md, Hinton KD), mean over all entries."""
    sq = jnp.mean((_f32(student_logits) - _f32(teacher_logits)) ** 2, axis=-1)
    return _lead_mean(sq, mask)


def hard_label_loss(student_logits, labels, weights=None):
    """The task loss: cross-entropy with integer labels, or MSE when there is one output.

    ``weights`` (optional, one per example): a weighted mean, ``sum(w * loss) / sum(w)`` (0 when
    every weight is 0), e.g. 0 for the unlabelled rows of a transfer set whose only targets are
    the teacher's outputs (Hinton et al. 2015)."""
    logits = _f32(student_logits)
    if logits.shape[-1] == 1:
        per_example = (logits[..., 0] - _f32(labels)) ** 2
    else:
        log_p = jax.nn.log_softmax(logits, axis=-1)
        per_example = -jnp.take_along_axis(log_p, jnp.asarray(labels)[..., None].astype(jnp.int32), -1)[..., 0]
    if weights is None:
        return jnp.mean(per_example)
    w = jnp.broadcast_to(_f32(weights), per_example.shape)
    return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-12)


def next_token_targets(input_ids, mask=None):
    """Targets and weights of a causal LM: position ``t`` predicts token ``t + 1``; a target
    counts when it and its context token are both valid (``mask`` [B,T], 1 = token).  Returns
    ``(targets [B,T-1], weights [B,T-1])``."""
    ids = jnp.asarray(input_ids)
    m = jnp.ones(ids.shape, jnp.float32) if mask is None else _f32(mask)
    return ids[:, 1:], m[:, 1:] * m[:, :-1]


def next_token_loss(logits, input_ids, mask=None):
    """Causal-LM cross-entropy (the hard-label loss of a decoder): the mean over valid targets
    (`next_token_targets`) of ``-log softmax(logits[:, t])[input_ids[:, t + 1]]``, in float32.
    Returns ``(loss, token_accuracy)``."""
    targets, w = next_token_targets(input_ids, mask)
    log_p = jax.nn.log_softmax(_f32(logits[:, :-1]), axis=-1)
    nll = -jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), -1)[..., 0]
    correct = (jnp.argmax(logits[:, :-1], -1) == targets).astype(jnp.float32)
    return _masked_mean(nll, w), _masked_mean(correct, w)


def hinton_loss(student_logits, teacher_logits, labels, *, temperature=1.0, hard_weight=0.5):
    """Hinton's mix (Hinton et al. 2015): ``a * CE(y, z_s) + (1 - a) * T^2 * softCE(z_t/T, z_s/T)``.

    ``a`` = ``hard_weight``; the ``T^2`` factor is always applied here, as the paper says to
    when mixing with the hard-label loss.
    """
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature, t2_scale=True)
    return hard_weight * hard_label_loss(student_logits, labels) + (1.0 - hard_weight) * soft


# ----------------------------------------------------------------------------- hidden states
def project(x, kernel=None, bias=None):
    """The learned linear map ``x W (+ b)`` of FitNet/TinyBERT (student width -> teacher width)."""
    if kernel is None:
        return x
    y = jnp.matmul(x, jnp.asarray(kernel, x.dtype))
    return y if bias is None else y + bias


def _check_widths(student, teacher, what):
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {student.shape} != teacher shape {teacher.shape}; "
            "give the match a projection (projection=True) when widths differ")


def hidden_mse(student, teacher, mask=None, *, kernel=None, bias=None):
    """Hidden-state MSE (FitNet, Romero et al. 2015; TinyBERT eq. for H^S W_h).

    ``mean over valid tokens and features of (h_s W + b - h_t)^2`` for [B,T,H] inputs (or any
    [..., H]); ``kernel``/``bias`` is the optional learned projection (W: [H_s, H_t]).
    """
    s = project(_f32(student), kernel, bias)
    t = _f32(teacher)
    _check_widths(s, t, "hidden_mse")
    sq = jnp.mean((s - t) ** 2, axis=-1)
    return _lead_mean(sq, mask)


def cosine_embedding_loss(student, teacher, mask=None, *, kernel=None, bias=None, eps=1e-8):
    """DistilBERT's cosine embedding loss (Sanh et al. 2019): mean over valid tokens of ``1 - cos(h_s, h_t)``."""
    s = project(_f32(student), kernel, bias)
    t = _f32(teacher)
    _check_widths(s, t, "cosine_embedding_loss")
    cos = jnp.sum(s * t, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), eps)
    return _lead_mean(1.0 - cos, mask)


def pkd_loss(student, teacher, mask=None, *, kernel=None, bias=None, eps=1e-8):
    """Patient-KD (Sun et al. 2019): squared distance of the L2-normalised [CLS] states.

    ``mean_b || s_cls / ||s_cls|| - t_cls / ||t_cls|| ||^2`` on the first token of [B,T,H]
    inputs (``mask`` is unused: the first token is never padding).
    """
    del mask
    s = project(_f32(student), kernel, bias)[:, 0]
    t = _f32(teacher)[:, 0]
    _check_widths(s, t, "pkd_loss")
    s = s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), eps)
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), eps)
    return jnp.mean(jnp.sum((s - t) ** 2, -1))


# ----------------------------------------------------------------------------- attention
def attention_mse(student, teacher, mask=None):
    """TinyBERT attention MSE (Jiao et al. 2020) on scores or probabilities [B,N,T,T].

    Mean over batch, heads and valid (query, key) pairs: pairs with a padded query or key are
    excluded (TinyBERT zeroes them; here they do not count in the mean either).
    """
    s, t = _f32(student), _f32(teacher)
    _check_widths(s, t, "attention_mse")
    sq = (s - t) ** 2
    if mask is None:
        return jnp.mean(sq)
    m = _f32(mask)
    pair = m[:, None, :, None] * m[:, None, None, :]
    return _masked_mean(sq, pair)


def masked_log_softmax(scores, mask=None):
    """log softmax over the last (key) axis of [B,...,T,T] scores with padded keys excluded."""
    x = _f32(scores)
    if mask is not None:
        x = x + _key_bias(mask, x.ndim)
    return jax.nn.log_softmax(x, axis=-1)


def _log_probs(p, mask):
    """Log of attention probabilities [B,...,T,T], renormalised over the valid keys."""
    return masked_log_softmax(jnp.log(jnp.maximum(_f32(p), 1e-30)), mask)


def log_distribution_kl(student_log_p, teacher_log_p, mask=None):
    """``sum_k p_t (log p_t - log p_s)`` over the last axis, mean over valid query rows (float32)."""
    log_t, log_s = _f32(teacher_log_p), _f32(student_log_p)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    if mask is None:
        return jnp.mean(kl)
    return _masked_mean(kl, _query_weights(mask, kl.ndim + 1))


def attention_kl(student, teacher, mask=None, *, from_scores=False):
    """KL(teacher attention || student attention) per query row (TinyBERT / MiniLM, docs/distillation.md).

    Inputs [B,N,T,T] are probabilities (``attn_probs``) or, with ``from_scores=True``, scaled
    scores before the mask (``attn_scores``) turned into distributions over the valid keys.
    Averaged over batch, heads and valid queries.  MiniLM's self-attention distribution
    transfer is this loss on the last layer's ``attn_probs``.
    """
    _check_widths(_f32(student), _f32(teacher), "attention_kl")
    if from_scores:
        log_s, log_t = masked_log_softmax(student, mask), masked_log_softmax(teacher, mask)
    else:
        log_s, log_t = _log_probs(student, mask), _log_probs(teacher, mask)
    return log_distribution_kl(log_s, log_t, mask)


# ----------------------------------------------------------------------------- MiniLM relations
def split_relation_heads(x, num_relation_heads):
    """[B,N,T,D] (per-head) or [B,T,A] vectors -> [B,R,T,A/R] relation heads (MiniLMv2).

    The heads are concatenated in order (width ``A = N * D``) and re-split into ``R`` equal
    relation heads, so teacher and student with different head counts share ``R``.
    """
    x = _f32(x)
    if x.ndim == 4:
        b, n, t, d = x.shape
        x = x.transpose(0, 2, 1, 3).reshape(b, t, n * d)
    b, t, a = x.shape
    if a % num_relation_heads:
        raise ValueError(f"width {a} is not divisible by num_relation_heads={num_relation_heads}")
    return x.reshape(b, t, num_relation_heads, a // num_relation_heads).transpose(0, 2, 1, 3)


def self_relation(x, mask=None, num_relation_heads=None):
    """MiniLM relation ``log softmax(X X^T / sqrt(d))`` per (relation) head -> [B,R,T,T] log-probs.

    ``x`` is [B,N,T,D] (queries, keys or values per attention head, MiniLM's value relation
    when ``num_relation_heads`` is None) or re-split into ``num_relation_heads`` (MiniLMv2).
    """
    if num_relation_heads is not None:
        x = split_relation_heads(x, num_relation_heads)
    x = _f32(x)
    scores = jnp.matmul(x, jnp.swapaxes(x, -1, -2)) / math.sqrt(x.shape[-1])
    return masked_log_softmax(scores, mask)


def value_relation_kl(student_values, teacher_values, mask=None):
    """MiniLM value-relation transfer (Wang et al. 2020): KL between ``softmax(V V^T / sqrt(d))``.

    Per attention head (teacher and student need the same number of heads; their head
    widths may differ); averaged over batch, heads and valid queries.
    """
    if student_values.shape[1] != teacher_values.shape[1]:
        raise ValueError(
            f"value_relation_kl needs equal head counts (student {student_values.shape[1]}, "
            f"teacher {teacher_values.shape[1]}); use relation_kl with num_relation_heads")
    return log_distribution_kl(self_relation(student_values, mask), self_relation(teacher_values, mask), mask)


def relation_kl(student, teacher, mask=None, *, num_relation_heads=1):
    """MiniLMv2 multi-head self-attention relation transfer (Wang et al. 2021).

    ``student``/``teacher`` are queries, keys or values ([B,N,T,D] or [B,T,A]); both are
    re-split into ``num_relation_heads`` heads and the KL between their
    ``softmax(X_r X_r^T / sqrt(d_r))`` is averaged over batch, relation heads and valid queries.
    Use it for query-query, key-key and value-value relations.
    """
    return log_distribution_kl(self_relation(student, mask, num_relation_heads),
                               self_relation(teacher, mask, num_relation_heads), mask)


# ----------------------------------------------------------------------------- PKD layer maps
def pkd_last_k(num_teacher_layers, num_student_layers):
    """PKD-Last: student layer i (0-based) learns from teacher layer ``L_t - L_s + i``."""
    _check_layer_counts(num_teacher_layers, num_student_layers)
    return tuple(num_teacher_layers - num_student_layers + i for i in range(num_student_layers))


def pkd_skip(num_teacher_layers, num_student_layers):
    """PKD-Skip: student layer i (0-based) learns from every k-th teacher layer, ``k = L_t // L_s``.

    Teacher layer ``(i + 1) * k - 1``, so the last student layer meets the last teacher layer
    when ``L_s`` divides ``L_t`` (6 -> 3: teacher layers 1, 3, 5).
    """
    _check_layer_counts(num_teacher_layers, num_student_layers)
    k = num_teacher_layers // num_student_layers
    return tuple((i + 1) * k - 1 for i in range(num_student_layers))


def _check_layer_counts(lt, ls):
    if not (isinstance(lt, int) and isinstance(ls, int) and 1 <= ls <= lt):
        raise ValueError(f"need 1 <= student layers <= teacher layers, got {ls} and {lt}")
