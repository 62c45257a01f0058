"""Round to nearest (RTN) and GPTQ for one linear layer, and the calibration statistics of its
input: the per-layer half of one-shot post-training quantization (docs/oneshot.md).

Layout.  A kernel is a Flax Linear kernel ``[d_in, d_out]`` (``y = x @ kernel``).  The papers
write ``W`` as ``[out, in]`` and sweep over its *columns*; those are our *rows* (one input
feature, all outputs), so "column i" of a paper is ``kernel[i, :]`` here.

Grid.  Our symmetric uniform grid (`efficient_nlp.quant.quantizers`): codes in
``[-2^(b-1), 2^(b-1) - 1]``, ``values = scale * codes``, ``scale = max|w| * (1 / Qp)`` over the
weights sharing it (a zero range gets scale 1), ``bits`` in 2..8.  Scales are per output channel,
``[1, d_out]`` (``group_size=None``), or group-wise, ``[d_in // g, 1, d_out]`` (``g`` consecutive
input rows share one scale per output column: `quantizers.group_view`).  `expand_scales`
broadcasts either to ``[d_in, d_out]`` and ``values == expand_scales(scales, d_in) * codes``
exactly; `rtn` equals ``quantizers.uniform(kernel, bits, axis=0, group_size=g)`` bit for bit.

Calibration statistics.  A model-level pass never holds every token: it feeds batches of a
layer's inputs to `hessian_update`, which keeps an `InputStats` (the Gram matrix
``H = 2/n sum_t x_t x_t^T`` as a running mean, the token count and per-input-channel sums of
squares, sums of absolute values and maxima).  Every function that reads calibration inputs
(here, in `efficient_nlp.quant.smoothing` and `efficient_nlp.prune.oneshot`) takes either such
statistics or an array ``[n, d_in]`` (or ``[..., d_in]``) of inputs.

The sweep shared with SparseGPT (`sweep`): ``H' = H + lam I`` with ``lam = damp * mean(diag H)``
(inputs that never fire, ``H_ii = 0``, get ``H_ii = 1`` and a zeroed weight row first), ``U``
the upper Cholesky factor of ``H'^-1`` (``H'^-1 = U^T U``); rows are processed in order and the
error of each, ``e = (w_i - q(w_i)) / U_ii``, is spread over the rows not yet processed,
``w_j -= U_ij e`` (Frantar et al. 2022, eq. 3 and its Cholesky form in section 4, step 3), within
a block of ``block_size`` rows at once and on the later rows once per block ("lazy batch
updates").  Matmuls use full float32 precision (no TF32 on GPUs).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.prune.masks import _count
from efficient_nlp.prune.patterns import nm_mask, topk_mask
from efficient_nlp.quant.quantizers import check_group_size, quantize_codes, ungroup, uniform_params

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- statistics
class InputStats(NamedTuple):
    """Calibration statistics of one layer input (a pytree: jit-able, device-resident).

    ``H``: ``[d_in, d_in]`` float32, ``2/n sum_t x_t x_t^T`` (the GPTQ / SparseGPT Hessian of the
    layer-wise squared error); ``n``: int32 token count; ``sumsq``, ``abssum``, ``absmax``:
    ``[d_in]`` float32 per-input-channel ``sum_t x_tj^2`` (Wanda's ``||X_j||_2^2``),
    ``sum_t |x_tj|`` (AWQ's mean ``|X_j|`` times n) and ``max_t |x_tj|`` (SmoothQuant)."""

    H: jax.Array
    n: jax.Array
    sumsq: jax.Array
    abssum: jax.Array
    absmax: jax.Array


def init_stats(d_in: int) -> InputStats:
    """Empty statistics (no token) of an input with ``d_in`` channels."""
    if isinstance(d_in, bool) or not isinstance(d_in, (int, np.integer)) or d_in < 1:
        raise ValueError(f"init_stats: d_in must be an int >= 1, got {d_in!r}")
    z = jnp.zeros((int(d_in),), jnp.float32)
    return InputStats(jnp.zeros((int(d_in), int(d_in)), jnp.float32), jnp.zeros((), jnp.int32), z, z, z)


def hessian_update(state: InputStats, x, mask=None) -> InputStats:
    """``state`` with the tokens of ``x [..., d_in]`` added (jit-able).

    ``mask [...]`` (``x``'s shape without the last axis; bool or numbers, nonzero = a real token)
    selects the tokens; padding is left out of every statistic.  ``H`` stays the running mean
    ``2/n sum x x^T``: ``H <- H * n_old / n + (2 / n) X^T X`` over the new real tokens."""
    d_in = state.H.shape[0]
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"hessian_update: inputs of shape {x.shape} do not match statistics of d_in={d_in} "
                         f"(the last axis of x must be d_in)")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"hessian_update: mask of shape {mask.shape} does not match inputs {x.shape}; "
                             f"give one entry per token, shape {x.shape[:-1]}")
        keep = mask.reshape(-1) != 0
    x = x.reshape(-1, d_in)
    if mask is not None:
        x = jnp.where(keep[:, None], x, 0.0)
        k = jnp.sum(keep, dtype=jnp.int32)
    else:
        k = jnp.asarray(x.shape[0], jnp.int32)
    n = state.n + k
    total = jnp.maximum(n, 1).astype(jnp.float32)
    xtx = jnp.matmul(x.T, x, precision=_HIGHEST)
    h = state.H * (state.n.astype(jnp.float32) / total) + xtx * (2.0 / total)
    a = jnp.abs(x)
    return InputStats(h, n, state.sumsq + jnp.sum(x * x, axis=0), state.abssum + jnp.sum(a, axis=0),
                      jnp.maximum(state.absmax, jnp.max(a, axis=0, initial=0.0)))


def as_stats(inputs, kernel_shape, where: str) -> InputStats:
    """``inputs`` (an `InputStats` or an array ``[..., d_in]`` of calibration inputs) as
    statistics for a kernel of ``kernel_shape``; a ValueError naming both shapes when ``d_in``
    differs, or when there is no token."""
    d_in = kernel_shape[0]
    if isinstance(inputs, InputStats):
        if inputs.H.shape != (d_in, d_in):
            raise ValueError(f"{where}: statistics of an input with {inputs.H.shape[0]} channels (H {inputs.H.shape}) "
                             f"do not match the kernel {tuple(kernel_shape)} (d_in={d_in})")
        if not isinstance(inputs.n, jax.core.Tracer) and int(inputs.n) == 0:
            raise ValueError(f"{where}: the statistics hold no calibration token (n=0); feed inputs with "
                             f"hessian_update first")
        return inputs
    x = jnp.asarray(inputs)
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(f"{where}: calibration inputs of shape {x.shape} do not match the kernel "
                         f"{tuple(kernel_shape)}: their last axis must be d_in={d_in}")
    if x.size == 0:
        raise ValueError(f"{where}: calibration inputs of shape {x.shape} hold no token; give at least one "
                         f"(fewer tokens than d_in are fine: damping keeps H invertible)")
    return hessian_update(init_stats(d_in), x)


# ----------------------------------------------------------------------------- validation
def check_kernel(kernel, where: str):
    """``kernel`` as a float32 ``[d_in, d_out]`` array, or a ValueError naming its shape."""
    w = jnp.asarray(kernel)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"{where}: expected a 2-D Linear kernel [d_in, d_out], got shape {w.shape}")
    return w.astype(jnp.float32)


def check_bits(bits, where: str) -> int:
    """``bits`` as an int in 2..8 (the signed weight grid), or a ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"{where}: bits must be an int in 2..8 (a symmetric weight grid; 1 bit would be "
                         f"{{-s, 0}}), got {bits!r}")
    return int(bits)


def _group(group_size, d_in: int, where: str):
    return None if group_size is None else check_group_size(d_in, group_size, where)


def _check_sweep_args(damp, block_size, where: str):
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.floating)) or not damp >= 0:
        raise ValueError(f"{where}: damp must be a number >= 0 (the fraction of mean(diag H) added to the "
                         f"diagonal; 0.01 as in the paper), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"{where}: block_size must be an int >= 1 (rows updated together), got {block_size!r}")


# ----------------------------------------------------------------------------- scales and RTN
def expand_scales(scales, d_in: int):
    """Per-channel ``[1, d_out]`` or group ``[d_in // g, 1, d_out]`` scales broadcast to the
    kernel's shape ``[d_in, d_out]``."""
    scales = jnp.asarray(scales)
    if scales.ndim == 2 and scales.shape[0] == 1:
        return jnp.broadcast_to(scales, (d_in, scales.shape[1]))
    if scales.ndim == 3 and scales.shape[1] == 1 and d_in % scales.shape[0] == 0:
        groups, _, d_out = scales.shape
        return ungroup(jnp.broadcast_to(scales, (groups, d_in // groups, d_out)))
    raise ValueError(f"expand_scales: scales of shape {scales.shape} are neither per channel [1, d_out] nor "
                     f"group-wise [d_in // g, 1, d_out] for d_in={d_in}")


def _scales(w, bits: int, group_size):
    if group_size is None:
        return uniform_params(w, bits, axis=0)[0]
    return uniform_params(w, bits, axis=0, group_size=group_size)[0]


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _rtn(w, bits, group_size):
    scales = _scales(w, bits, group_size)
    codes = quantize_codes(w, scales, jnp.zeros_like(scales), bits)
    return expand_scales(scales, w.shape[0]) * codes.astype(jnp.float32), scales


def rtn(kernel, bits: int, group_size: int | None = None):
    """Round to nearest: ``(values, scales)`` of ``kernel [d_in, d_out]`` on our symmetric b-bit
    grid, per output channel (``group_size=None``, scales ``[1, d_out]``) or per group of
    ``group_size`` consecutive input rows (scales ``[d_in // g, 1, d_out]``; W4 g128 is the
    usual LLM setting).  The baseline of GPTQ and AWQ; equal to `quantizers.uniform` exactly."""
    w = check_kernel(kernel, "rtn")
    return _rtn(w, check_bits(bits, "rtn"), _group(group_size, w.shape[0], "rtn"))


# ----------------------------------------------------------------------------- the sweep
def _inverse_cholesky(h, damp):
    """``U`` upper with ``U^T U = (H + damp * mean(diag H) I)^-1``.

    Without forming the inverse: ``H = R R^T`` with ``R = U^-1`` upper, and reversing the order
    of rows and columns (``J``) turns that into a plain Cholesky factorisation,
    ``J H J = (J R J)(J R J)^T``; so ``U = (J chol(J H J) J)^-1`` (one factorisation and one
    triangular solve instead of two factorisations and an inverse)."""
    d = h.shape[0]
    h = h + (damp * jnp.mean(jnp.diagonal(h))) * jnp.eye(d, dtype=h.dtype)
    r = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return jnp.triu(jax.scipy.linalg.solve_triangular(r, jnp.eye(d, dtype=h.dtype), lower=False))


def _block_rows(w, u, row_scales, counts, start, *, bits, sub, block, n_m, d_real):
    """Processes rows ``start .. start + block`` of ``w``: returns the block's values, codes,
    keep mask, error rows ``e`` and (dynamic groups) scales."""
    d_out = w.shape[1]
    quant, dynamic = bits is not None, bits is not None and row_scales is None
    wb = jax.lax.dynamic_slice_in_dim(w, start, block)
    ub = jax.lax.dynamic_slice(u, (start, start), (block, block))
    diag = jnp.diagonal(ub)
    if counts is not None:   # unstructured: this block's mask, from the weights updated so far
        score = jnp.square(wb / diag[:, None])
        score = jnp.where((start + jnp.arange(block) < d_real)[:, None], score, jnp.inf)
        keep = jax.vmap(topk_mask, (1, None), 1)(score, counts[start // block])
    else:
        keep = jnp.ones(wb.shape, bool)
    rs = None if not quant or dynamic else jax.lax.dynamic_slice_in_dim(row_scales, start, block)
    m = n_m[1] if n_m else 1

    def sub_step(g, carry):
        wb, qb, cb, kb, eb, sb, nmk = carry
        s0 = g * sub
        if dynamic:   # a group's scales, from its rows as updated by every earlier row
            sc = uniform_params(jax.lax.dynamic_slice_in_dim(wb, s0, sub), bits, axis=0)[0][0]
            sb = sb.at[g].set(sc)

        def row_step(r, carry):
            wb, qb, cb, kb, eb, nmk = carry
            i = s0 + r
            row = wb[i]
            if n_m:      # N:M: the mask of the M rows starting here, chosen when the sweep reaches them
                nmk = jax.lax.cond(i % m == 0, lambda: nm_mask(jnp.square(
                    jax.lax.dynamic_slice_in_dim(wb, i, m) / jax.lax.dynamic_slice_in_dim(diag, i, m)[:, None]),
                    n_m[0], m, axis=0), lambda: nmk)
                k = nmk[i % m]
            else:
                k = kb[i]
            if quant:
                scale = sc if dynamic else rs[i]
                c = jnp.where(k, quantize_codes(row, scale, jnp.zeros_like(scale), bits), 0).astype(jnp.int8)
                q = scale * c.astype(jnp.float32)
                cb = cb.at[i].set(c)
            else:
                q = jnp.where(k, row, 0.0)
            e = (row - q) / diag[i]
            wb = wb - ub[i][:, None] * e[None, :]   # U is upper: rows before i are unchanged
            return wb, qb.at[i].set(q), cb, kb.at[i].set(k), eb.at[i].set(e), nmk

        wb, qb, cb, kb, eb, nmk = jax.lax.fori_loop(0, sub, row_step, (wb, qb, cb, kb, eb, nmk))
        return wb, qb, cb, kb, eb, sb, nmk

    zeros = jnp.zeros_like(wb)
    init = (wb, zeros, jnp.zeros(wb.shape, jnp.int8), keep, zeros, jnp.ones((block // sub, d_out), jnp.float32),
            jnp.ones((m, d_out), bool))
    _, qb, cb, kb, eb, sb, _ = jax.lax.fori_loop(0, block // sub, sub_step, init)
    return qb, cb, kb, eb, sb


@functools.partial(jax.jit, static_argnames=("act_order",))
def _prepare(kernel, h, damp, *, act_order):
    """Dead inputs handled (``H_ii = 1``, zero weight row), the processing order (``perm``;
    decreasing ``diag(H)`` with ``act_order``) and ``U`` in that order; a separate jit from the
    sweep so that every sweep of one shape shares this compilation."""
    dead = jnp.diagonal(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[:, None], 0.0, kernel)
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(h.shape[0])
    u = _inverse_cholesky(h[perm][:, perm] if act_order else h, damp)
    return w, u, perm, jnp.all(jnp.isfinite(u))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "act_order", "block", "n_m", "unstructured"))
def _sweep(w, u, perm, counts, *, bits, group_size, act_order, block, n_m, unstructured):
    d_in, d_out = w.shape
    quant = bits is not None
    dynamic = quant and group_size is not None and not act_order
    row_scales = scales = None
    if quant and not dynamic:   # per channel, or static groups: from the weights before any update
        scales = _scales(w, bits, group_size)
        row_scales = expand_scales(scales, d_in)
    if act_order:
        w = w[perm]
        row_scales = None if row_scales is None else row_scales[perm]
    d_pad = -(-d_in // block) * block
    pad = d_pad - d_in
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d_pad) >= d_in).astype(u.dtype)
    if row_scales is not None:
        row_scales = jnp.pad(row_scales, ((0, pad), (0, 0)), constant_values=1.0)
    sub = group_size if dynamic else block
    cols = jnp.arange(d_pad)[None, :]

    def block_step(b, carry):
        w, out, codes, keep, group_scales = carry
        start = b * block
        qb, cb, kb, eb, sb = _block_rows(w, u, row_scales, counts if unstructured else None, start, bits=bits,
                                         sub=sub, block=block, n_m=n_m, d_real=d_in)
        later = jnp.where(cols >= start + block, jax.lax.dynamic_slice_in_dim(u, start, block), 0.0)
        w = w - jnp.matmul(later.T, eb, precision=_HIGHEST)
        out = jax.lax.dynamic_update_slice_in_dim(out, qb, start, 0)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, cb, start, 0)
        keep = jax.lax.dynamic_update_slice_in_dim(keep, kb, start, 0)
        group_scales = jax.lax.dynamic_update_slice_in_dim(group_scales, sb, start // sub, 0)
        return w, out, codes, keep, group_scales

    init = (w, jnp.zeros_like(w), jnp.zeros(w.shape, jnp.int8), jnp.ones(w.shape, bool),
            jnp.ones((d_pad // sub, d_out), jnp.float32))
    _, out, codes, keep, group_scales = jax.lax.fori_loop(0, d_pad // block, block_step, init)
    out, codes, keep = out[:d_in], codes[:d_in], keep[:d_in]
    if act_order:
        inv = jnp.argsort(perm)
        out, codes, keep = out[inv], codes[inv], keep[inv]
    if dynamic:
        scales = group_scales[: d_in // group_size][:, None, :]
    if quant:
        out = expand_scales(scales, d_in) * codes.astype(jnp.float32)
    return out, keep, scales


class Swept(NamedTuple):
    """What `sweep` returns: ``values`` ``[d_in, d_out]`` (quantized and / or pruned, zero in dead
    rows), ``keep`` (bool, False = pruned), ``scales`` (None without ``bits``)."""

    values: jax.Array
    keep: jax.Array
    scales: jax.Array | None


def sweep(kernel, inputs, *, bits=None, group_size=None, act_order=False, damp=0.01, block_size=128,
          sparsity=None, n_m=None, where="sweep") -> Swept:
    """The row sweep shared by GPTQ and SparseGPT (module docstring); `gptq` and
    `efficient_nlp.prune.oneshot.sparsegpt` validate their arguments and call it.

    ``bits``: quantize every kept row on the grid (per channel from the weights before the
    sweep; ``group_size`` groups from each group's rows as updated when the sweep reaches it, or,
    with ``act_order``, all up front from the weights before the sweep).  ``act_order``: rows in
    decreasing ``diag(H)``.
    Pruning: ``sparsity`` (unstructured; per output column the rows with the smallest
    ``w^2 / U_ii^2`` of each block of ``block_size`` rows, chosen at the block's start, so many
    that ``round(sparsity * r)`` rows are pruned among the first ``r`` at every block boundary
    ``r``: exactly ``round(sparsity * d_in)`` per column in all) or ``n_m = (N, M)`` (keep N of
    every M consecutive rows per column, chosen when the sweep reaches them).  Pruned weights
    give ``q = 0``.  Blocks are cut to a multiple of the group size and of M (at least one of
    each), so a group never straddles two blocks.  ``bits``, ``group_size``, ``sparsity`` and
    ``n_m`` are not validated here (the callers do)."""
    w = check_kernel(kernel, where)
    stats = as_stats(inputs, w.shape, where)
    _check_sweep_args(damp, block_size, where)
    unit = math.lcm(group_size if group_size and not act_order else 1, n_m[1] if n_m else 1)
    block = unit * max(1, int(block_size) // unit)
    counts = None
    if sparsity is not None and not n_m:
        bounds = np.minimum(np.arange(0, -(-w.shape[0] // block) * block + 1, block), w.shape[0])
        counts = jnp.diff(_count(sparsity, bounds))
    w, u, perm, ok = _prepare(w, stats.H, jnp.float32(damp), act_order=bool(act_order))
    if not isinstance(ok, jax.core.Tracer) and not bool(ok):
        raise ValueError(f"{where}: the damped Hessian is not positive definite in float32 (Cholesky failed); "
                         f"increase damp (got {damp}) or check the calibration inputs for inf / nan")
    out, keep, scales = _sweep(w, u, perm, counts, bits=bits, group_size=group_size, act_order=bool(act_order),
                               block=block, n_m=n_m, unstructured=counts is not None)
    return Swept(out, keep, scales)


# ----------------------------------------------------------------------------- GPTQ
def gptq(kernel, inputs, bits: int, group_size: int | None = None, act_order: bool = False, damp: float = 0.01,
         block_size: int = 128):
    """GPTQ (Frantar et al. 2022): ``(values, scales)`` of ``kernel [d_in, d_out]`` on our b-bit
    grid, minimising the layer output error ``||X W' - X W||^2`` row by row with error feedback.

    ``inputs``: `InputStats` or calibration inputs ``[n, d_in]`` (any ``n >= 1``: with fewer
    tokens than ``d_in`` the damping keeps ``H`` invertible).  The algorithm (the paper's
    Algorithm 1 in our layout; see the module docstring for the sweep): ``H = 2/n X^T X``, dead
    inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight row, ``lam = damp * mean(diag H)``,
    ``U = chol((H + lam I)^-1)`` upper; for each input row ``i`` in order,
    ``e = (w_i - q(w_i)) / U_ii`` and ``w_j -= U_ij e`` for ``j > i``, applied lazily in blocks of
    ``block_size`` rows.

    Scales: per output channel (``group_size=None``) from the weights before the sweep (after
    the dead rows are zeroed, so a dead input does not widen the grid; the reference code takes
    them before zeroing); group-wise from each group's rows as updated by every earlier row at
    the moment the sweep reaches the group (the paper's section 4 "lazy" groups; the reference
    code reads them from weights that miss the current block's updates when ``g < block_size``,
    we cut blocks at group boundaries so every earlier row counts).  ``act_order``: rows in
    decreasing ``diag(H)`` (the "act-order" heuristic of the reference code); with group-wise
    scales AND act_order every group's scales are computed up front from the weights before the
    sweep ("static groups"), so a group is still ``g`` consecutive input rows as our format
    needs, whatever the processing order.

    Returns values ``[d_in, d_out]`` (``== expand_scales(scales, d_in) * codes`` exactly; zero
    in dead rows) and scales ``[1, d_out]`` or ``[d_in // g, 1, d_out]``.  The same weights with
    `rtn` are the baseline; `layer_error` compares both on the statistics.
    """
    w = check_kernel(kernel, "gptq")
    bits = check_bits(bits, "gptq")
    g = _group(group_size, w.shape[0], "gptq")
    out = sweep(w, inputs, bits=bits, group_size=g, act_order=act_order, damp=damp, block_size=block_size,
                where="gptq")
    return out.values, out.scales


# ----------------------------------------------------------------------------- errors
@jax.jit
def _trace_error(dw, h):
    return 0.5 * jnp.sum(dw * jnp.matmul(h, dw, precision=_HIGHEST))


def layer_error(kernel, new_kernel, inputs):
    """``||X W' - X W||^2 / n`` (summed over outputs, averaged over tokens) from the statistics:
    ``tr(dW^T H dW) / 2`` with ``dW = W' - W`` and ``H = 2/n X^T X`` (no damping), so a pass
    can report each layer's error without keeping its tokens.  A float32 scalar."""
    w = check_kernel(kernel, "layer_error")
    new = check_kernel(new_kernel, "layer_error")
    if new.shape != w.shape:
        raise ValueError(f"layer_error: new kernel of shape {new.shape} differs from the kernel {w.shape}")
    return _trace_error(new - w, as_stats(inputs, w.shape, "layer_error").H)


__all__ = ["InputStats", "init_stats", "hessian_update", "as_stats", "expand_scales", "rtn", "gptq",
           "layer_error", "sweep", "Swept", "check_kernel", "check_bits"]
