"""Per-input-channel smoothing scales for one-shot quantization: SmoothQuant and AWQ
(docs/oneshot.md).

Both rescale the input channels of a group of Linear kernels that read the same input (e.g. q,
k and v): ``W' = diag(s) W`` (`scale_kernel`) and ``X' = X diag(s)^-1``, with ``1/s`` folded into
whatever produces ``X`` (a LayerNorm's scale and bias, or the output columns of the Linear
before), so ``X' W' = X W`` and the float model is unchanged; only the difficulty of quantizing
``X'`` and ``W'`` moves.  Kernels are Flax ``[d_in, d_out]``, so ``s`` scales kernel *rows*
(the papers' ``W`` is ``[out, in]`` and ``s`` scales its columns).  Calibration ``inputs`` are
`efficient_nlp.quant.rounding.InputStats` or an array ``[n, d_in]``; the weight grid is ours
(`efficient_nlp.quant.rounding.rtn`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.quant import rounding as G
from efficient_nlp.quant.quantizers import check_group_size, qrange, quantize_codes

_S_MIN, _S_MAX = 1e-5, 1e5


def scale_kernel(kernel, s):
    """``diag(s) @ kernel``: row ``j`` (input channel ``j``) of ``kernel [d_in, d_out]`` times
    ``s_j``; the kernel's dtype is kept."""
    kernel = jnp.asarray(kernel)
    s = jnp.asarray(s)
    if kernel.ndim != 2 or s.shape != (kernel.shape[0],):
        raise ValueError(f"scale_kernel: expected a kernel [d_in, d_out] and scales [d_in], got {kernel.shape} "
                         f"and {s.shape}")
    return (kernel * s[:, None].astype(kernel.dtype)).astype(kernel.dtype)


def _kernels(kernels, where: str):
    if isinstance(kernels, (list, tuple)):
        ws = [G.check_kernel(k, where) for k in kernels]
    else:
        ws = [G.check_kernel(kernels, where)]
    if not ws:
        raise ValueError(f"{where}: give at least one kernel (the Linears that read this input)")
    d_in = ws[0].shape[0]
    if any(w.shape[0] != d_in for w in ws):
        raise ValueError(f"{where}: the kernels read one input, so they need the same d_in; got shapes "
                         f"{[tuple(w.shape) for w in ws]}")
    return ws


def _check_alpha(alpha, where: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 <= alpha <= 1:
        raise ValueError(f"{where}: alpha must be a number in [0, 1] (migration strength), got {alpha!r}")
    return float(alpha)


def smoothquant_scales(inputs, kernels, alpha: float = 0.5):
    """SmoothQuant (Xiao et al. 2022, eq. 4): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``max|X_j|`` is the largest absolute calibration input of channel ``j`` (``InputStats.absmax``)
    and ``max|W_j|`` the largest absolute weight of input row ``j`` over every kernel in
    ``kernels`` (one kernel or the list reading this input, e.g. ``[q, k, v]``) and every
    output.  alpha = 0.5 is the paper's default (larger moves more of the activation range into
    the weights).  Returns ``s [d_in]`` float32.  Away from 0: a channel whose inputs or weights
    are all zero is left alone (``s_j = 1``: nothing to migrate), and ``s`` is clipped to
    ``[1e-5, 1e5]`` (the reference code clamps both maxima and ``s`` below at 1e-5).
    """
    ws = _kernels(kernels, "smoothquant_scales")
    alpha = _check_alpha(alpha, "smoothquant_scales")
    stats = G.as_stats(inputs, ws[0].shape, "smoothquant_scales")
    a = stats.absmax
    wmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(w), axis=1) for w in ws])
    live = (a > 0) & (wmax > 0)
    s = jnp.power(jnp.where(live, a, 1.0), alpha) / jnp.power(jnp.where(live, wmax, 1.0), 1.0 - alpha)
    return jnp.clip(jnp.where(live, s, 1.0), _S_MIN, _S_MAX)


def _awq_s(mean_abs, alpha):
    """``mean|X_j|^alpha`` over ``sqrt(max * min)`` of the same (AWQ's normalisation)."""
    s = jnp.power(mean_abs, alpha)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _awq_errors(kernels, stats, mean_abs, alphas, *, bits, group_size):
    def error(alpha):
        s = _awq_s(mean_abs, alpha)[:, None]
        return sum(G.layer_error(w, G.rtn(w * s, bits, group_size)[0] / s, stats) for w in kernels)

    return jax.lax.map(error, alphas)


def awq_scales(kernels, inputs, bits: int, group_size: int | None = None, grid: int = 20):
    """AWQ (Lin et al. 2023, eq. 4-5): activation-aware scales ``s = mean|X_j|^alpha`` for
    weight-only quantization of ``kernels`` (one kernel or the list reading this input) with
    `efficient_nlp.quant.rounding.rtn` at ``bits`` / ``group_size``.

    ``alpha`` runs over the grid ``{0, 1/grid, ..., (grid-1)/grid}`` (the reference code's 20
    points in [0, 1)); for each, ``s`` is normalised by ``sqrt(max(s) * min(s))`` as in the
    reference code and the error is ``sum over kernels of ||(X / s) Q(diag(s) W) - X W||^2 / n``
    = ``tr(dW^T H dW) / 2`` with ``dW = diag(1/s) Q(diag(s) W) - W`` (from the Hessian
    statistics, the same units as `efficient_nlp.quant.rounding.layer_error`; the paper measures the
    output of the whole block, we measure these Linears).  alpha = 0 gives ``s = 1``, plain RTN,
    so the chosen error is never above RTN's.  A channel whose mean ``|x|`` is below 1e-4 of the
    largest channel's is raised to that floor (the reference clamps ``s`` at 1e-4), so ``s > 0``.

    Returns ``(s [d_in] float32, alpha (float), errors [grid])``: fold ``1/s`` into what
    produces the input and quantize ``scale_kernel(W, s)`` (with `rtn`, `awq_clip` or GPTQ).
    Not jit-able (alpha comes back as a Python float).
    """
    ws = _kernels(kernels, "awq_scales")
    bits = G.check_bits(bits, "awq_scales")
    g = None if group_size is None else check_group_size(ws[0].shape[0], group_size, "awq_scales")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"awq_scales: grid must be an int >= 1 (alpha points in [0, 1)), got {grid!r}")
    stats = G.as_stats(inputs, ws[0].shape, "awq_scales")
    mean_abs = stats.abssum / stats.n.astype(jnp.float32)
    top = jnp.max(mean_abs)
    mean_abs = jnp.where(top > 0, jnp.maximum(mean_abs, 1e-4 * top), 1.0)
    alphas = jnp.arange(int(grid), dtype=jnp.float32) / int(grid)
    errors = _awq_errors(tuple(ws), stats, mean_abs, alphas, bits=bits, group_size=g)
    best = int(jnp.argmin(errors))
    return _awq_s(mean_abs, alphas[best]), best / int(grid), errors


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _awq_clip(w, h, ratios, *, bits, group_size):
    d_in, d_out = w.shape
    groups = d_in // group_size
    _, qp = qrange(bits)
    wg = w.reshape(groups, group_size, d_out)
    idx = jnp.arange(groups)
    hb = h.reshape(groups, group_size, groups, group_size)[idx, :, idx, :]   # the diagonal blocks of H
    amax = jnp.max(jnp.abs(wg), axis=1, keepdims=True)

    def scales(r):
        return jnp.where(amax > 0, r * amax * (1.0 / qp), 1.0)

    def error(r):
        s = scales(r)
        dw = s * quantize_codes(wg, s, jnp.zeros_like(s), bits).astype(jnp.float32) - wg
        return 0.5 * jnp.einsum("gaj,gab,gbj->gj", dw, hb, dw, precision=jax.lax.Precision.HIGHEST)

    best = jnp.argmin(jax.lax.map(error, ratios), axis=0)   # the first minimum: ratio 1 (RTN) on ties
    s = scales(ratios[best][:, None, :])
    codes = quantize_codes(wg, s, jnp.zeros_like(s), bits).astype(jnp.float32)
    return (s * codes).reshape(d_in, d_out), s, ratios[best]


def awq_clip(kernel, inputs, bits: int, group_size: int | None = None, grid: int = 20, max_shrink: float = 0.5):
    """AWQ's clipping search (Lin et al. 2023, section 3.3 and the reference code): RTN with the
    range of each scale group shrunk, ``scale = r * max|w| / Qp``, ``r`` in
    ``{1, 1 - 1/grid, ..., 1 - (k-1)/grid}`` with ``k = int(max_shrink * grid)`` (1 down to 0.55
    by default), chosen per group and output column to minimise that group's share of the
    output error, ``dW_g^T H_gg dW_g / 2`` (``H_gg``: the diagonal block of the statistics'
    ``H`` for the group's inputs; the cross-group terms are ignored, as in the reference code,
    so the total error is not guaranteed below RTN's, while every group's own term is).  Weights
    beyond the clipped range get the extreme codes.  Run it on ``scale_kernel(W, s)`` after
    `awq_scales` (with the scaled statistics, i.e. inputs ``X / s``).

    Returns ``(values, scales, ratios)``: values ``== expand_scales(scales, d_in) * codes``,
    scales ``[1, d_out]`` per channel or ``[d_in // g, 1, d_out]``, and the chosen ratios
    ``[1 or d_in // g, d_out]``.
    """
    w = G.check_kernel(kernel, "awq_clip")
    bits = G.check_bits(bits, "awq_clip")
    g = w.shape[0] if group_size is None else check_group_size(w.shape[0], group_size, "awq_clip")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"awq_clip: grid must be an int >= 1, got {grid!r}")
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0 <= max_shrink < 1:
        raise ValueError(f"awq_clip: max_shrink must be in [0, 1) (the largest fraction of the range cut), "
                         f"got {max_shrink!r}")
    stats = G.as_stats(inputs, w.shape, "awq_clip")
    ratios = 1.0 - jnp.arange(max(1, int(max_shrink * grid)), dtype=jnp.float32) / int(grid)
    values, scales, chosen = _awq_clip(w, stats.H, ratios, bits=bits, group_size=g)
    return values, (scales[0] if group_size is None else scales), chosen


__all__ = ["scale_kernel", "smoothquant_scales", "awq_scales", "awq_clip"]
