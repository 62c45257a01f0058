"""Cross distillation (CD) for few-shot pruning: pure per-layer losses and sparsifiers.

Bai et al. 2020, "Few shot network compression via cross distillation"; docs/cross_distillation.md.
A prunable layer computes ``layer_fn(w, h)`` (a dense layer ``h @ kernel + bias``, a
convolution, ...); ``w`` is any pytree (e.g. ``{"kernel", "bias"}``).  Teacher and student
run the same layer with their own weights ``w_t``, ``w_s`` on their own inputs ``h_t``, ``h_s``
(the student's input differs because the layers before it are already pruned).

* layer-wise distillation ("w/o CD"): ``L_r = || w_T * h_T - w_S * h_S ||^2``;
* correction ``L_c = || w_T * h_T - w_S * h_T ||^2`` (teacher input fed to the student layer);
* imitation  ``L_i = || w_T * h_S - w_S * h_S ||^2`` (student input fed to the teacher layer);
* CD: ``mu * L_c + (1 - mu) * L_i`` (`cross_distillation_loss`);
* soft CD: ``h_T~ = alpha h_T + (1 - alpha) h_S``, ``h_S~ = (1 - beta) h_T + beta h_S``,
  ``|| s(w_T * h_T~) - s(w_S * h_S~) ||^2`` (`soft_cross_distillation_loss`; (1, 1) is ``L_r``).

``||.||^2`` is taken as the MEAN squared error over all output elements (the squared norm
divided by their number), so a loss does not grow with the number of shots.  Only ``w_s``
receives gradients: teacher weights and both inputs are constants (``stop_gradient``).

Sparsifiers (applied to a kernel after every optimiser step, `sparsify`), driven by a target
sparsity ``s`` (a schedule's value, may be traced) and a `Pattern` whose units are removed
together (elements; kernel rows / conv input channels; heads):

* ``"topk"``: projection onto the ``1 - s`` largest units (the official code's variant);
* ``"prox"``: the proximal operator of the (group) L1 norm, ``soft_threshold`` /
  `efficient_nlp.prune.transform.group_shrink`, with ``lambda`` = the smallest value that zeroes
  ``s`` of the units (the ``round(s n)``-th smallest unit norm), plus an optional extra
  ``lam_extra``; surviving weights shrink by ``lambda``, which is about the size of one step's
  regrowth once the target is reached.  The paper's linear lambda schedule is this lambda driven
  by a linear sparsity ramp (`linear_ramp`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from efficient_nlp.prune.patterns import Pattern, kth_smallest, topk_mask, unstructured
from efficient_nlp.prune.transform import group_shrink, soft_threshold

SPARSIFIERS = ("topk", "prox")


# ----------------------------------------------------------------------------- layer functions
def dense_layer(w, h):
    """``h @ kernel (+ bias)``; ``w = {"kernel": [in, out], "bias": [out] (optional)}``."""
    y = jnp.matmul(h, w["kernel"])
    return y + w["bias"] if w.get("bias") is not None else y


def conv_layer(w, h, *, padding="SAME"):
    """2-D convolution of NHWC ``h`` with an HWIO ``kernel`` (stride 1) plus ``bias``."""
    y = jax.lax.conv_general_dilated(h, w["kernel"], (1, 1), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + w["bias"] if w.get("bias") is not None else y


def _mse(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)))


def _const(*xs):
    return tuple(jax.tree.map(jax.lax.stop_gradient, x) for x in xs)


# ----------------------------------------------------------------------------- losses
def layerwise_loss(w_s, w_t, h_s, h_t, layer_fn: Callable, activation: Callable | None = None):
    """Plain layer-wise distillation ("w/o CD", Bai et al. 2020): ``|| s(w_T h_T) - s(w_S h_S) ||^2``."""
    w_t, h_s, h_t = _const(w_t, h_s, h_t)
    s = activation or (lambda x: x)
    return _mse(s(layer_fn(w_t, h_t)), s(layer_fn(w_s, h_s)))


def correction_loss(w_s, w_t, h_t, layer_fn: Callable):
    """Correction loss ``L_c = || w_T h_T - w_S h_T ||^2`` (Bai et al. 2020): the teacher's input
    fed to the student layer."""
    w_t, h_t = _const(w_t, h_t)
    return _mse(layer_fn(w_t, h_t), layer_fn(w_s, h_t))


def imitation_loss(w_s, w_t, h_s, layer_fn: Callable):
    """Imitation loss ``L_i = || w_T h_S - w_S h_S ||^2`` (Bai et al. 2020): the student's input
    fed to the teacher layer."""
    w_t, h_s = _const(w_t, h_s)
    return _mse(layer_fn(w_t, h_s), layer_fn(w_s, h_s))


def cross_distillation_loss(w_s, w_t, h_s, h_t, mu, layer_fn: Callable):
    """Cross distillation ``L = mu L_c + (1 - mu) L_i`` (Bai et al. 2020; defaults mu = 0.6 for
    VGG-like nets, 0.9 for residual nets).  ``mu = 1`` is the correction loss, ``mu = 0`` the
    imitation loss.  Gradients flow into ``w_s`` only."""
    mu = jnp.asarray(mu, jnp.float32)
    return mu * correction_loss(w_s, w_t, h_t, layer_fn) + (1.0 - mu) * imitation_loss(w_s, w_t, h_s, layer_fn)


def soft_cross_distillation_loss(w_s, w_t, h_s, h_t, alpha, beta, layer_fn: Callable,
                                 activation: Callable | None = None):
    """Soft cross distillation (Bai et al. 2020): inputs mixed as ``h_T~ = alpha h_T + (1-alpha) h_S``
    and ``h_S~ = (1-beta) h_T + beta h_S``, loss ``|| s(w_T h_T~) - s(w_S h_S~) ||^2`` with ``s``
    the layer's ``activation`` (None: identity).  ``(alpha, beta) = (1, 1)`` is plain layer-wise
    distillation (`layerwise_loss`); defaults (0.9, 0.3) VGG-like, (0.9, 0.5) residual nets;
    ``alpha + beta < 1`` is a bad region."""
    w_t, h_s, h_t = _const(w_t, h_s, h_t)
    alpha = jnp.asarray(alpha, h_t.dtype)
    beta = jnp.asarray(beta, h_t.dtype)
    ht_mix = alpha * h_t + (1 - alpha) * h_s
    hs_mix = (1 - beta) * h_t + beta * h_s
    s = activation or (lambda x: x)
    return _mse(s(layer_fn(w_t, ht_mix)), s(layer_fn(w_s, hs_mix)))


LOSSES = ("cd", "scd", "layerwise", "correction", "imitation")


def layer_loss(name: str, *, mu=0.6, alpha=0.9, beta=0.3, activation=None) -> Callable:
    """``fn(w_s, w_t, h_s, h_t, layer_fn) -> scalar`` for a loss name in `LOSSES`."""
    if name == "cd":
        return lambda w_s, w_t, h_s, h_t, f: cross_distillation_loss(w_s, w_t, h_s, h_t, mu, f)
    if name == "scd":
        return lambda w_s, w_t, h_s, h_t, f: soft_cross_distillation_loss(w_s, w_t, h_s, h_t, alpha, beta, f,
                                                                          activation)
    if name == "layerwise":
        return lambda w_s, w_t, h_s, h_t, f: layerwise_loss(w_s, w_t, h_s, h_t, f, activation)
    if name == "correction":
        return lambda w_s, w_t, h_s, h_t, f: correction_loss(w_s, w_t, h_t, f)
    if name == "imitation":
        return lambda w_s, w_t, h_s, h_t, f: imitation_loss(w_s, w_t, h_s, f)
    raise ValueError(f"unknown cross-distillation loss {name!r}; choose one of {LOSSES}")


# ----------------------------------------------------------------------------- sparsity
def linear_ramp(step, ramp_steps, target):
    """``target * min(1, step / ramp_steps)`` (``ramp_steps <= 0``: the target at once)."""
    if ramp_steps <= 0:
        return jnp.asarray(target, jnp.float32)
    return jnp.asarray(target, jnp.float32) * jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)


def unit_norms(kernel, pattern: Pattern | None = None, name: str = "kernel"):
    """Per-unit L2 norms of ``kernel`` under ``pattern`` (unstructured: ``|w|``), flattened."""
    pattern = pattern or unstructured()
    return jnp.sqrt(pattern.reduce(name, jnp.square(kernel.astype(jnp.float32)))).reshape(-1)


def sparsify(kernel, sparsity, *, method: str = "topk", pattern: Pattern | None = None,
             name: str = "kernel", lam_extra=0.0):
    """``kernel`` with ``round(sparsity * units)`` units removed (see the module docstring for
    ``method``).  ``name`` is the parameter path the pattern sees (heads need one)."""
    pattern = pattern or unstructured()
    norms = unit_norms(kernel, pattern, name)
    n = norms.shape[0]
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
    unit_shape = jax.eval_shape(lambda x: pattern.reduce(name, x),
                                jax.ShapeDtypeStruct(kernel.shape, jnp.float32)).shape
    if method == "topk":
        keep = topk_mask(norms, k).reshape(unit_shape)
        return jnp.where(pattern.expand(name, keep, kernel.shape), kernel, jnp.zeros((), kernel.dtype))
    if method == "prox":
        lam = kth_smallest(norms, k) + lam_extra
        if pattern.name == "unstructured":
            return soft_threshold(kernel, lam)
        return group_shrink({name: kernel}, pattern, lam)[name]
    raise ValueError(f"unknown sparsifier {method!r}; choose one of {SPARSIFIERS}")


def unit_sparsity(kernel, pattern: Pattern | None = None, name: str = "kernel") -> float:
    """Fraction of the pattern's units of ``kernel`` that are entirely zero."""
    return float(jnp.mean(unit_norms(kernel, pattern, name) == 0))
