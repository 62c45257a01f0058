"""Quantizers with straight-through gradients: pure, jit-able ``fn(x, ...) -> x_hat``.

Equations as in docs/quantization.md ("Quantizers").  Every quantizer returns a *fake-quantized*
float tensor (the values lie on a b-bit grid, the dtype is that of ``x``); the integer codes behind
it are available from `quantize_codes` (uniform grids), `ternary_codes` and `binary_codes`, and
``x_hat`` equals the dequantized codes exactly, so integer export reproduces QAT bit for bit.

Conventions (one everywhere):

* ``bits`` is a static Python int in 1..8.  Signed (symmetric) grids use ``Qn = -2^(b-1)``,
  ``Qp = 2^(b-1) - 1`` and need ``bits >= 2`` (at 1 bit the grid {-s, 0} is degenerate: use
  `bwn` / `binary_codes` for binary weights).  Unsigned (asymmetric) grids use ``Qn = 0``,
  ``Qp = 2^b - 1`` and accept ``bits = 1``.
* ``axis`` is the axis (int or tuple) REDUCED when computing a range, like a numpy reduction with
  ``keepdims=True``: a ``[out, in]`` embedding quantized row-wise uses ``axis=1`` (scales
  ``[out, 1]``); a Flax ``[in, out]`` kernel quantized per output channel uses ``axis=0`` (scales
  ``[1, out]``).  ``axis=None`` reduces everything and gives 0-d (scalar) scales.
* Group-wise scales (``group_size = g``, the RTN / GPTQ "g128" setting, docs/quantization.md):
  the FIRST axis (a Flax kernel's ``d_in``) is cut into blocks of ``g`` consecutive entries and
  every block has its own scale per remaining index.  The grouped view is
  ``group_view(x, g) = x.reshape(d_in // g, g, ...)`` and group scales (and LSQ steps) are
  keepdims over its axis 1: ``[d_in // g, 1, d_out]`` for a ``[d_in, d_out]`` kernel; ``ungroup``
  undoes the view.  `uniform`, `uniform_params` and `lsq_init` take ``group_size``; `lsq`,
  `lsq_plus`, `quantize_codes` and `dequantize` recognise a group-shaped parameter (one more
  axis than ``x``) and work through the view, so ``x`` and the codes keep their ``[d_in, d_out]``
  shape.  ``group_size = d_in`` is per channel (one block) with scales ``[1, 1, d_out]``.
* ``round`` is round-half-to-even (``jnp.round``, as ``numpy.round``).
* Straight-through estimators (STE): where the estimator is the identity (`uniform`, `twn`,
  `bwn`) the forward value is ``stop_gradient(x_hat) + (x - stop_gradient(x))``, which is exactly
  ``x_hat`` for finite ``x`` and has the identity gradient (forward mode works too); ranges,
  scales and thresholds computed from ``x`` are constants (``stop_gradient``).  Where the
  estimator is masked or reaches learned parameters (`clip_quant`, `lsq`, `lsq_plus`) it is a
  ``jax.custom_vjp`` (reverse mode only).

Integer codes (`uniform_params` / `quantize_codes` / `dequantize`)::

    codes = clip(round(x / scale + zero_point), -2^(b-1), 2^(b-1) - 1)      int8
    x_hat = scale * (codes - zero_point)

* signed: ``scale = max|x| / Qp``, ``zero_point = 0``, so ``x_hat = scale * codes``, codes in
  ``[Qn, Qp]``;
* unsigned: the unsigned level ``u = round((x - min) / scale)`` in ``[0, 2^b - 1]`` is stored
  offset by ``-2^(b-1)`` (``codes = u - 2^(b-1)``) so that every code fits int8 (also at 8 bits)
  and lies in the same range as signed codes; ``scale = (max - min) / Qp`` and
  ``zero_point = -min / scale - 2^(b-1)`` (a float, not rounded: ``min`` itself is on the grid,
  the grid being that of ``x - min`` shifted back by ``min``, so 0 is generally not).  An int8 x
  int8 matmul then needs one correction for both kinds:
  ``sum_k x_hat_k w_hat_k = s_x s_w (sum_k c_k d_k - zp_x sum_k d_k)`` for symmetric weights ``w_hat = s_w d``.
* At 1 bit (unsigned only) the codes are {-1, 0}: pack them with
  ``packing.pack(codes + 1, 1, signed=False)`` (the signed 1-bit packing is for binary codes
  {-1, +1}).

A zero range (an all-zero or constant group) gets ``scale = 1`` instead of 0, so nothing divides
by zero: an all-zero tensor quantizes to zeros and a constant one to (almost exactly) itself.

Arithmetic in float32: ranges, scales, zero points, codes and the dequantized values are computed
in float32 (float64 stays float64) whatever the input dtype, and fake-quantized outputs are cast
back to the input dtype.  A bfloat16 tensor therefore gets exactly the codes of the same values
in float32, and the integer export (float32) reproduces a bfloat16 QAT forward's codes.

Learned state is positive by construction: `lsq` and `lsq_plus` use ``max(|step|, MIN_STEP)``
and `clip_quant` the sorted pair ``(min(lo, hi), max(lo, hi))``, so an update that pushes a step
below zero or a clip value past the other cannot flip, empty or zero the grid (`positive_step`,
`clip_bounds`; the integer model and the export use the same two functions).

Activations take dynamic ranges per token or per example, never across a batch:
`activation_axis` gives the reduced axes (the last one, or all but the first).

Scales are computed as ``range * (1 / Qp)`` (a multiplication by a constant), never
``range / Qp``: XLA rewrites a division by a constant into that multiplication under ``jit`` but
not eagerly, which would make jitted and eager scales differ in the last bit.  Computed this way
``uniform_params`` (and so the exported integers) agree bit for bit with the jitted QAT forward.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

RANGE_MODES = ("absmax", "minmax", "nonneg")
#: Activation granularities (`activation_axis`): a range per token or per example.
ACTIVATION_GRANULARITIES = ("token", "example")
#: The floor of a learned step (the smallest normal float32): never 0, below any useful step.
MIN_STEP = float(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- validation
def _check_bits(bits, signed: bool, fn: str, *, min_signed: int = 2) -> int:
    """``bits`` as an int, or a ValueError naming the valid range and the fix."""
    if isinstance(bits, jax.Array):
        raise ValueError(f"{fn}: bits must be a static Python int, got an array (traced under jit?); "
                         f"mark it static (jax.jit(..., static_argnames='bits')) or close over it")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{fn}: bits must be an int in 1..8, got {bits!r}")
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be in 1..8, got {bits}")
    if signed and bits < min_signed:
        raise ValueError(
            f"{fn}: signed {bits}-bit quantization is degenerate (Qn=-1, Qp=0: the grid is "
            f"{{-s, 0}}); use bits >= {min_signed}, signed=False for two levels [min, max], or "
            f"bwn / binary_codes for binary weights (alpha * sign(w))")
    return bits


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Qn, Qp)``: ``(-2^(b-1), 2^(b-1) - 1)`` signed, ``(0, 2^b - 1)`` unsigned."""
    bits = _check_bits(bits, signed, "qrange")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _code_bounds(bits: int) -> tuple[int, int]:
    """The stored (int8) code range of both signed and offset-unsigned codes."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _out_dtype(x):
    """The dtype of a fake-quantized output: ``x``'s floating dtype (float32 for integers)."""
    x = jnp.asarray(x)
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _float(x):
    """``x`` in the quantizers' arithmetic dtype: at least float32 (bfloat16 / float16 and integers
    become float32, float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(_out_dtype(x), jnp.float32))


def activation_axis(granularity: str, ndim: int) -> tuple[int, ...]:
    """The axes reduced for one dynamic activation range: ``token`` the last axis (one range per
    token row, e.g. per ``[b, t]`` of a ``[B, T, H]`` input, per ``[b, n, t]`` of a ``[B, N, T, D]``
    attention operand), ``example`` every axis but the first (one per batch row).  Never the
    batch axis: a row's codes do not depend on the other rows of its batch."""
    if granularity not in ACTIVATION_GRANULARITIES:
        raise ValueError(f"activation_axis: granularity must be one of {ACTIVATION_GRANULARITIES}, got "
                         f"{granularity!r}")
    if ndim < 1:
        raise ValueError("activation_axis: a 0-d activation has no axis to reduce; give a [..., features] tensor")
    if granularity == "token" or ndim == 1:
        return (ndim - 1,)
    return tuple(range(1, ndim))


def positive_step(step):
    """``max(|step|, MIN_STEP)``: the step an LSQ grid uses, positive whatever the update did."""
    step = jnp.asarray(step)
    return jnp.maximum(jnp.abs(step), jnp.asarray(MIN_STEP, step.dtype))


def clip_bounds(lo, hi):
    """``(min(lo, hi), max(lo, hi))``: the clip range PACT uses, ordered whatever the update did."""
    return jnp.minimum(lo, hi), jnp.maximum(lo, hi)


def clip_scale(lo, hi, bits: int, signed: bool):
    """The grid step of `clip_quant` for ordered ``lo <= hi``: ``max(|lo|, |hi|) / Qp`` (signed)
    or ``(hi - lo) / Qp`` (unsigned); 1 for a zero range."""
    _, qp = qrange(bits, signed)
    r = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if signed else hi - lo
    return jnp.where(r > 0, r * (1.0 / qp), jnp.ones_like(r))


def _axes(axis, ndim: int, fn: str):
    """Normalised tuple of reduced axes (all axes for None)."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(f"{fn}: axis {axis!r} is not valid for a {ndim}-d tensor; give an int "
                             f"or a tuple of ints in [-{ndim}, {ndim}) (None = one scale)")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: axis {axis!r} repeats an axis")
    return tuple(sorted(out))


def _reduce(fn, x, axis, name):
    """A keepdims reduction over ``axis``; 0-d for ``axis=None``."""
    if axis is None:
        return fn(x)
    return fn(x, axis=_axes(axis, x.ndim, name), keepdims=True)


def _ste(x, x_hat):
    """``x_hat`` in the forward pass (exactly, for finite x), identity gradient w.r.t. ``x``."""
    return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))


def _sum_to_shape(g, shape):
    """Sums a cotangent of a broadcast result back to the shape of the broadcast operand."""
    shape = tuple(shape)
    lead = g.ndim - len(shape)
    if lead:
        g = jnp.sum(g, axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = jnp.sum(g, axis=axes, keepdims=True)
    return g.reshape(shape)


def _param(p, x, fn: str, what: str):
    """A learned parameter (step, clip value, offset) as an array of x's dtype that broadcasts to x."""
    p = jnp.asarray(p, x.dtype)
    try:
        shape = jnp.broadcast_shapes(x.shape, p.shape)
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"{fn}: {what} of shape {p.shape} does not broadcast to x's shape {x.shape}; "
                         f"give a scalar or a keepdims-shaped array (e.g. from lsq_init(x, bits, axis=...))")
    return p


# ----------------------------------------------------------------------------- groups
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_group_size(d_in: int, group_size, where: str = "group_view") -> int:
    """``group_size`` as an int that divides ``d_in``, or a ValueError naming both and the valid
    group sizes (the divisors of ``d_in``)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"{where}: group_size must be an int >= 1, got {group_size!r}")
    group_size, d_in = int(group_size), int(d_in)
    if d_in % group_size:
        raise ValueError(f"{where}: group size {group_size} does not divide d_in={d_in} (the input dimension, "
                         f"axis 0); valid group sizes: {_divisors(d_in)}")
    return group_size


def group_view(x, group_size: int):
    """``x [d_in, ...]`` as ``[d_in // g, g, ...]``: block ``i`` holds rows ``i*g .. i*g + g - 1``
    (g consecutive inputs share one scale per output column).  ``d_in`` must be a multiple of
    ``g`` (ValueError listing the valid group sizes otherwise)."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("group_view: a 0-d tensor has no input axis to group; give a [d_in, ...] tensor")
    g = check_group_size(x.shape[0], group_size)
    return x.reshape((x.shape[0] // g, g) + x.shape[1:])


def ungroup(x):
    """Inverse of `group_view`: ``[d_in // g, g, ...] -> [d_in, ...]``."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"ungroup: expected a grouped view [d_in // g, g, ...], got shape {x.shape}")
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _group_axis(axis, fn: str):
    """With ``group_size`` the grouped axis is the first one: ``axis`` must be None or 0."""
    if axis not in (None, 0) or isinstance(axis, bool):
        raise ValueError(f"{fn}: group_size groups axis 0 (the input rows of a [d_in, d_out] kernel); "
                         f"axis must be None or 0 with it, got {axis!r}")


def group_size_of(x, p) -> int:
    """The group size ``g`` of a group-shaped parameter ``p`` of ``x`` (a scale, zero point or
    step ``[d_in // g, 1, ...]``: one more axis than ``x``), else 0."""
    p_shape = jnp.shape(p)
    if x.ndim >= 1 and len(p_shape) == x.ndim + 1 and p_shape[1] == 1 and p_shape[0] >= 1 \
            and x.shape[0] % p_shape[0] == 0:
        return x.shape[0] // p_shape[0]
    return 0


# ----------------------------------------------------------------------------- uniform
def uniform_params(x, bits, signed=True, axis=None, range_mode="absmax", *, group_size=0):
    """``(scale, zero_point)`` of the uniform b-bit grid of ``x`` (docs/quantization.md, "Quantizers").

    signed: ``scale = max|x| / Qp``, ``zero_point = 0``.  ``range_mode="minmax"`` uses
    ``max(|min x|, |max x|) / Qp``, which is the same number (a symmetric grid needs a symmetric
    range); both names are accepted so configs can say which estimator they mean.
    unsigned: ``scale = (max - min) / Qp`` with ``Qp = 2^b - 1`` and
    ``zero_point = -min / scale - 2^(b-1)`` (codes offset to int8, see the module docstring);
    ``absmax`` and ``minmax`` use ``[min, max]``, ``nonneg`` uses ``[0, max(max x, 0)]`` (for
    non-negative tensors such as attention probabilities: 0 is a level, so exact zeros, e.g. of
    masked keys, stay exactly 0 and the range does not depend on how many there are; unsigned
    only).  Ranges are reduced over ``axis`` (keepdims; 0-d for
    None), treated as constants (``stop_gradient``); a zero range gives ``scale = 1``.
    ``group_size = g``: one range per block of ``g`` rows and column (``axis`` None or 0), scales
    ``[d_in // g, 1, ...]`` (see the module docstring).
    """
    bits = _check_bits(bits, signed, "uniform_params")
    if range_mode not in RANGE_MODES:
        raise ValueError(f"uniform_params: range_mode must be one of {RANGE_MODES}, got {range_mode!r}")
    x = jax.lax.stop_gradient(_float(x))
    if group_size:
        _group_axis(axis, "uniform_params")
        x, axis = group_view(x, group_size), 1
    qn, qp = qrange(bits, signed)
    if signed and range_mode == "nonneg":
        raise ValueError("uniform_params: range_mode='nonneg' is an unsigned grid [0, max]; give signed=False "
                         "or range_mode='absmax'")
    if signed:
        if range_mode == "absmax":
            r = _reduce(jnp.max, jnp.abs(x), axis, "uniform_params")
        else:
            r = jnp.maximum(jnp.abs(_reduce(jnp.min, x, axis, "uniform_params")),
                            jnp.abs(_reduce(jnp.max, x, axis, "uniform_params")))
        scale = jnp.where(r > 0, r * (1.0 / qp), jnp.ones_like(r))
        return scale, jnp.zeros_like(scale)
    hi = _reduce(jnp.max, x, axis, "uniform_params")
    if range_mode == "nonneg":
        hi = jnp.maximum(hi, 0)
        lo = jnp.zeros_like(hi)
    else:
        lo = _reduce(jnp.min, x, axis, "uniform_params")
    r = hi - lo
    scale = jnp.where(r > 0, r * (1.0 / qp), jnp.ones_like(r))
    zero_point = -lo / scale - 2 ** (bits - 1)
    return scale, zero_point


def quantize_codes(x, scale, zero_point, bits, signed=True):
    """int8 codes ``clip(round(x / scale + zero_point), -2^(b-1), 2^(b-1) - 1)``.

    With ``(scale, zero_point)`` from `uniform_params`: signed codes lie in ``[Qn, Qp]``; unsigned
    ones are the levels ``u in [0, 2^b - 1]`` offset by ``-2^(b-1)`` (the same int8 range).
    ``signed`` only validates ``bits`` (signed needs >= 2); the formula is the same.  Group
    scales ``[d_in // g, 1, ...]`` apply through `group_view`; the codes have ``x``'s shape.
    """
    bits = _check_bits(bits, signed, "quantize_codes")
    lo, hi = _code_bounds(bits)
    x = _float(x)
    g = group_size_of(x, scale)
    if g:
        return ungroup(quantize_codes(group_view(x, g), scale, zero_point, bits, signed))
    scale = jnp.asarray(scale, x.dtype)
    zero_point = jnp.asarray(zero_point, x.dtype)
    c = jnp.round(x / scale + zero_point)
    return jnp.minimum(jnp.maximum(c, lo), hi).astype(jnp.int8)


def dequantize(codes, scale, zero_point):
    """``scale * (codes - zero_point)`` in scale's dtype (``scale * codes`` when zero_point is 0);
    group scales ``[d_in // g, 1, ...]`` apply through `group_view` (the result has codes' shape)."""
    scale = _float(scale)
    g = group_size_of(jnp.asarray(codes), scale)
    if g:
        return ungroup(dequantize(group_view(codes, g), scale, zero_point))
    return scale * (jnp.asarray(codes).astype(scale.dtype) - jnp.asarray(zero_point, scale.dtype))


def uniform(x, bits, signed=True, axis=None, range_mode="absmax", *, group_size=0):
    """Uniform b-bit fake quantization with the range from the data (docs/quantization.md, "Quantizers").

    ``q(x) = s * clip(round(x / s), Qn, Qp)`` (signed, ``s = max|x| / Qp``) or
    ``s * clip(round((x - min) / s), 0, 2^b - 1) + min`` (unsigned, ``s = (max - min) / Qp``),
    computed as ``dequantize(quantize_codes(x, *uniform_params(x, ...)), ...)`` so it equals the
    exported integers exactly.  Gradient: straight-through identity w.r.t. ``x`` (the range is a
    constant).  See `uniform_params` for ``axis``, ``range_mode`` and ``group_size`` (group-wise
    round to nearest, RTN g128: one scale per ``group_size`` consecutive input rows and column).
    """
    bits = _check_bits(bits, signed, "uniform")
    x = jnp.asarray(x, _out_dtype(x))
    scale, zero_point = uniform_params(x, bits, signed, axis, range_mode, group_size=group_size)
    x_hat = dequantize(quantize_codes(x, scale, zero_point, bits, signed), scale, zero_point)
    return _ste(x, x_hat.astype(x.dtype))


# ----------------------------------------------------------------------------- PACT clipping
def _clip_forward(x, lo, hi, bits, signed):
    y = jnp.minimum(jnp.maximum(x, lo), hi)
    qn, qp = qrange(bits, signed)
    s = clip_scale(lo, hi, bits, signed)
    if signed:
        return s * jnp.clip(jnp.round(y / s), qn, qp)
    return lo + s * jnp.clip(jnp.round((y - lo) / s), 0, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _clip_quant(x, lo, hi, bits, signed):
    return _clip_forward(x, lo, hi, bits, signed)


def _clip_quant_fwd(x, lo, hi, bits, signed):
    return _clip_forward(x, lo, hi, bits, signed), (x, lo, hi)


def _clip_quant_bwd(bits, signed, res, g):
    x, lo, hi = res
    below, above = x < lo, x > hi
    zero = jnp.zeros_like(g)
    g_x = jnp.where(below | above, zero, g)
    g_lo = _sum_to_shape(jnp.where(below, g, zero), lo.shape)
    g_hi = _sum_to_shape(jnp.where(above, g, zero), hi.shape)
    return g_x, g_lo, g_hi


_clip_quant.defvjp(_clip_quant_fwd, _clip_quant_bwd)


def clip_quant(x, lo, hi, bits, signed=True):
    """PACT-style quantization with learnable clip values (PACT, Choi et al. 2018).

    Forward: ``y = clip(x, lo, hi)`` quantized on a b-bit grid

    * unsigned: the ``2^b`` levels ``lo + k * s``, ``s = (hi - lo) / (2^b - 1)``, ``k = 0..2^b-1``
      (both clip values are levels; PACT's ReLU case is ``lo = 0``);
    * signed: the symmetric grid ``s * k``, ``k in [Qn, Qp]``, ``s = max(|lo|, |hi|) / Qp``
      (0 is a level; with ``lo = -hi`` this is ``[-hi, hi]`` in ``2^b - 1`` levels).

    Gradients (straight-through inside, the grid's dependence on lo/hi is ignored): ``x`` gets
    the upstream gradient where ``lo <= x <= hi`` and 0 outside; ``lo`` the sum of the upstream
    gradients where ``x < lo``, ``hi`` the sum where ``x > hi`` (summed to their shapes: scalars,
    or keepdims arrays for per-channel clip values).  The pair is used ordered (`clip_bounds`):
    clip values that an update swapped keep a valid grid (the gradients follow the swap).
    Computed in float32 (module docstring), the output in ``x``'s dtype.
    """
    bits = _check_bits(bits, signed, "clip_quant")
    dtype, x = _out_dtype(x), _float(x)
    lo, hi = clip_bounds(_param(lo, x, "clip_quant", "lo"), _param(hi, x, "clip_quant", "hi"))
    return _clip_quant(x, lo, hi, bits, signed).astype(dtype)


# ----------------------------------------------------------------------------- LSQ / LSQ+
def _elements_per_step(x, s) -> int:
    """Elements that share one step: ``x.size / s.size`` (``x.size`` for a scalar step)."""
    return max(1, x.size // max(1, s.size))


def _lsq_grad_scale(x, s, qp, grad_scale):
    if grad_scale is not None:
        return float(grad_scale)
    return 1.0 / math.sqrt(_elements_per_step(x, s) * qp)


def _lsq_forward(x, s, qn, qp):
    return s * jnp.clip(jnp.round(x / s), qn, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x, s, qn, qp, g_scale):
    return _lsq_forward(x, s, qn, qp)


def _lsq_fwd(x, s, qn, qp, g_scale):
    return _lsq_forward(x, s, qn, qp), (x, s)


def _lsq_bwd(qn, qp, g_scale, res, g):
    x, s = res
    v = x / s
    low, high = v <= qn, v >= qp
    g_x = jnp.where(low | high, jnp.zeros_like(g), g)
    ds = jnp.where(low, float(qn), jnp.where(high, float(qp), jnp.round(v) - v))
    g_s = _sum_to_shape(ds * g * g_scale, s.shape)
    return g_x, g_s


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(x, step, bits, signed=True, *, grad_scale=None):
    """LSQ: learned step size (Esser et al. 2020).

    Forward ``s * clip(round(x / s), Qn, Qp)``.  Backward (``v = x / s``):

    * ``d/dx = grad`` where ``Qn < v < Qp``, 0 where ``v <= Qn`` or ``v >= Qp``;
    * ``d/ds = sum g_scale * grad * {Qn if v <= Qn; Qp if v >= Qp; round(v) - v otherwise}``,
      summed over the elements that share the step (``step`` is a scalar or a keepdims array that
      broadcasts to ``x``, e.g. per channel);
    * ``g_scale = 1 / sqrt(numel * Qp)`` where ``numel`` is the number of elements sharing one
      step, ``x.size / step.size`` (``x.size`` for a scalar step; the per-channel choice keeps
      each channel's gradient on the per-tensor scale).  ``grad_scale`` overrides it (1.0 = none).

    The grid uses ``positive_step(step) = max(|step|, MIN_STEP)``: a step that an update pushed
    negative quantizes like its magnitude (its gradient is flipped accordingly) and a zero step
    cannot divide by zero.  Signed needs ``bits >= 2``.  A group step ``[d_in // g, 1, ...]``
    (``lsq_init(x, ..., group_size=g)``) applies through `group_view` (``numel = g``).  Computed in
    float32 (module docstring), the output in ``x``'s dtype.
    """
    bits = _check_bits(bits, signed, "lsq")
    g = group_size_of(jnp.asarray(x), step)
    if g:
        return ungroup(lsq(group_view(x, g), step, bits, signed, grad_scale=grad_scale))
    dtype, x = _out_dtype(x), _float(x)
    s = positive_step(_param(step, x, "lsq", "step"))
    qn, qp = qrange(bits, signed)
    return _lsq(x, s, qn, qp, _lsq_grad_scale(x, s, qp, grad_scale)).astype(dtype)


def lsq_init(x, bits, signed=True, axis=None, *, group_size=0):
    """LSQ step initialisation: ``2 * mean|x| / sqrt(Qp)`` (signed) or ``4 * mean|x| / sqrt(Qp)``
    (unsigned), the mean over ``axis`` (keepdims; 0-d for None), or with ``group_size = g`` over
    each block of ``g`` rows per column (steps ``[d_in // g, 1, ...]``).  An all-zero group gets
    1.0 so the step is never 0."""
    bits = _check_bits(bits, signed, "lsq_init")
    x = jax.lax.stop_gradient(_float(x))
    if group_size:
        _group_axis(axis, "lsq_init")
        x, axis = group_view(x, group_size), 1
    _, qp = qrange(bits, signed)
    m = _reduce(jnp.mean, jnp.abs(x), axis, "lsq_init")
    s = m * ((2.0 if signed else 4.0) / math.sqrt(qp))
    return jnp.where(s > 0, s, jnp.ones_like(s))


def _lsq_plus_forward(x, s, b, qp):
    return s * jnp.clip(jnp.round((x - b) / s), 0, qp) + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq_plus(x, s, b, qp, g_scale):
    return _lsq_plus_forward(x, s, b, qp)


def _lsq_plus_fwd(x, s, b, qp, g_scale):
    return _lsq_plus_forward(x, s, b, qp), (x, s, b)


def _lsq_plus_bwd(qp, g_scale, res, g):
    x, s, b = res
    v = (x - b) / s
    low, high = v <= 0, v >= qp
    clipped = low | high
    zero = jnp.zeros_like(g)
    g_x = jnp.where(clipped, zero, g)
    ds = jnp.where(low, 0.0, jnp.where(high, float(qp), jnp.round(v) - v))
    g_s = _sum_to_shape(ds * g * g_scale, s.shape)
    g_b = _sum_to_shape(jnp.where(clipped, g, zero), b.shape)
    return g_x, g_s, g_b


_lsq_plus.defvjp(_lsq_plus_fwd, _lsq_plus_bwd)


def lsq_plus(x, step, offset, bits, *, grad_scale=None):
    """LSQ+: asymmetric LSQ with a learnable offset (Bhalgat et al. 2020).

    Forward ``s * clip(round((x - b) / s), 0, Qp) + b`` with ``Qp = 2^b - 1`` (unsigned grid,
    ``bits`` in 1..8).  Backward (``v = (x - b) / s``): ``d/dx = grad`` where ``0 < v < Qp``, else
    0; ``d/ds`` as in `lsq` with ``Qn = 0`` (same ``g_scale`` and ``grad_scale``); ``d/db`` = the
    sum of the upstream gradients of the clipped elements (``v <= 0`` or ``v >= Qp``): inside the
    grid the offset cancels (``-1 + 1``), outside ``x_hat`` moves with it.  The offset's gradient
    is not scaled.  ``step`` and ``offset`` are scalars or keepdims arrays broadcasting to ``x``,
    or group-shaped ``[d_in // g, 1, ...]`` (applied through `group_view`).  The step is used as
    ``positive_step(step)`` (see `lsq`); the offset is free.  Computed in float32, the output in
    ``x``'s dtype.
    """
    bits = _check_bits(bits, False, "lsq_plus")
    g = group_size_of(jnp.asarray(x), step) or group_size_of(jnp.asarray(x), offset)
    if g:
        return ungroup(lsq_plus(group_view(x, g), step, offset, bits, grad_scale=grad_scale))
    dtype, x = _out_dtype(x), _float(x)
    s = positive_step(_param(step, x, "lsq_plus", "step"))
    b = _param(offset, x, "lsq_plus", "offset")
    _, qp = qrange(bits, False)
    return _lsq_plus(x, s, b, qp, _lsq_grad_scale(x, s, qp, grad_scale)).astype(dtype)


# ----------------------------------------------------------------------------- TWN / BWN
def ternary_codes(w, axis=None):
    """TWN codes and scale (Li et al. 2016; docs/quantization.md): ``(codes int8 in {-1, 0, 1}, alpha)``.

    ``Delta = 0.7 * mean|w|`` and ``alpha = mean of |w_i| over {|w_i| >= Delta}``, both over
    ``axis`` (keepdims; 0-d for None); ``codes = sign(w)`` where ``|w| >= Delta``, else 0.  An
    empty kept set gives ``alpha = 0``.  ``twn(w)[0] == alpha * codes`` exactly.
    """
    w = jax.lax.stop_gradient(_float(w))
    a = jnp.abs(w)
    delta = 0.7 * _reduce(jnp.mean, a, axis, "ternary_codes")
    keep = a >= delta
    count = _reduce(jnp.sum, keep.astype(w.dtype), axis, "ternary_codes")
    total = _reduce(jnp.sum, jnp.where(keep, a, jnp.zeros_like(a)), axis, "ternary_codes")
    alpha = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.zeros_like(total))
    codes = jnp.where(keep, jnp.sign(w), jnp.zeros_like(w)).astype(jnp.int8)
    return codes, alpha


def binary_codes(w, axis=None):
    """BWN codes and scale (Rastegari et al. 2016; docs/quantization.md): ``(codes int8 in {-1, +1}, alpha)``.

    ``alpha = mean|w|`` over ``axis`` (keepdims; 0-d for None); ``codes = sign(w)`` with
    ``sign(0) = +1``, so every element is +-alpha and ``bwn(w1) + bwn(w2)`` is exact algebra
    (the ternary weight splitting of docs/binarybert.md relies on it).
    """
    w = jax.lax.stop_gradient(_float(w))
    alpha = _reduce(jnp.mean, jnp.abs(w), axis, "binary_codes")
    codes = jnp.where(w >= 0, 1, -1).astype(jnp.int8)
    return codes, alpha


def twn(w, axis=None):
    """Ternary weights ``(w_hat, alpha)``: ``w_hat = alpha * codes`` of `ternary_codes`;
    straight-through identity gradient w.r.t. ``w`` (alpha and Delta are constants)."""
    w = jnp.asarray(w, _out_dtype(w))
    codes, alpha = ternary_codes(w, axis)
    return _ste(w, (alpha * codes.astype(alpha.dtype)).astype(w.dtype)), alpha


def bwn(w, axis=None):
    """Binary weights ``(w_hat, alpha)``: ``w_hat = alpha * codes`` of `binary_codes`
    (``sign(0) = +1``); straight-through identity gradient w.r.t. ``w`` (alpha is a constant)."""
    w = jnp.asarray(w, _out_dtype(w))
    codes, alpha = binary_codes(w, axis)
    return _ste(w, (alpha * codes.astype(alpha.dtype)).astype(w.dtype)), alpha


__all__ = ["RANGE_MODES", "ACTIVATION_GRANULARITIES", "MIN_STEP", "activation_axis", "positive_step", "clip_bounds",
           "clip_scale", "qrange", "group_view", "ungroup", "check_group_size", "group_size_of", "uniform",
           "uniform_params", "quantize_codes", "dequantize", "clip_quant", "lsq", "lsq_init", "lsq_plus", "twn", "bwn", "ternary_codes",
           "binary_codes"]
