"""ONNX emitters of the integer model's sites (`efficient_nlp.quant.to_integer_model`).

Activation quantization is emitted as ops, with the arithmetic of
`efficient_nlp.quant.activation_codes` (so the codes are those of our integer model up to the
float rounding of the ops before it):

* dynamic ``uniform`` range, per token (last axis) or per example (all axes but the first):
  signed ``s = max|x| * (1/Qp)`` (``ReduceMax(Abs)``; 1 for a zero range),
  ``c = Cast<int8>(Clip(Round(x / s), Qn, Qp))``; unsigned ``[min, max]`` (or ``[0, max]`` for
  the attention probabilities) ``s = (max - min) * (1/Qp)``, ``zp = -min / s - 2^(b-1)``,
  ``c = Clip(Round(x / s + zp), -2^(b-1), 2^(b-1) - 1)``, offset ``-s * (zp + 2^(b-1))``;
* learned LSQ / LSQ+ steps and PACT clip values: the same with constant scales (PACT clips
  ``x`` to ``[lo, hi]`` first).

Unsigned grids are carried as their levels ``u = c + 2^(b-1)`` in ``uint8`` and signed ones as
``int8`` codes, so one ``MatMulInteger`` (uint8/int8 x int8 -> int32) gives the exact integer
sum ``sum_k u_k d_k`` that our model forms as ``c @ d + shift * colsum(d)``.  Then
``y = s_w * (s_x * acc + offset * colsum(d)) + bias`` in float32, as `IntLinear`.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from efficient_nlp.deploy.onnx_graph import Graph
from efficient_nlp.quant import quantizers as Q

INT8, UINT8, INT32, FLOAT, BOOL = 3, 2, 6, 1, 9  # onnx.TensorProto data types


@dataclasses.dataclass(frozen=True)
class Codes:
    """Emitted activation codes: ``x_hat = scale * codes + offset`` (offset None: 0).

    ``codes`` is int8 (signed grid) or uint8 (the levels of an unsigned grid); ``scale`` and
    ``offset`` are keepdims tensors over the reduced axes (``dynamic``) or constants."""

    codes: str
    scale: str
    offset: str | None
    dynamic: bool


def _clip_round(g: Graph, v: str, lo: int, hi: int, hint: str) -> str:
    return g.op("Clip", [g.op("Round", [v], hint + ".round"), g.const(lo), g.const(hi)], hint + ".clip")


def _safe_scale(g: Graph, r: str, qp: int, hint: str) -> str:
    """``where(r > 0, r * (1/Qp), 1)`` (`quantizers.uniform_params`)."""
    scaled = g.op("Mul", [r, g.const(1.0 / qp)], hint + ".scale_raw")
    positive = g.op("Greater", [r, g.const(0.0)], hint + ".positive")
    return g.op("Where", [positive, scaled, g.const(1.0)], hint + ".scale")


def _reduced_axes(qm, ndim: int) -> list[int]:
    granularity = qm.quantizer.granularity
    if granularity not in Q.ACTIVATION_GRANULARITIES:
        raise ValueError(f"ONNX export: activation quantizer {qm.quantizer.name} has granularity {granularity!r}; "
                         f"dynamic activation ranges must be per {' or '.join(Q.ACTIVATION_GRANULARITIES)}")
    return list(Q.activation_axis(granularity, ndim))


def activation_codes(g: Graph, qm, x: str, ndim: int, hint: str) -> Codes:
    """Emit the codes of ``qm`` (a calibrated `QuantizerModule`) on ``x`` (an ``ndim``-d float32)."""
    q = qm.quantizer
    m, b, signed = q.method, q.bits, q.signed
    if not qm.calibrated:
        raise RuntimeError(f"activation quantizer {q.name} is not calibrated; run quant.calibrate first")
    if qm.frozen:
        raise ValueError(f"ONNX export: the activation quantizer at {hint} is frozen (passes values through); "
                         "a frozen quantizer belongs to a restored weight, not an activation")
    half = 2 ** (b - 1)
    if m == "uniform":
        axes = _reduced_axes(qm, ndim)
        if signed:
            r = g.reduce("ReduceMax", g.op("Abs", [x], hint + ".abs"), axes, hint + ".absmax")
            s = _safe_scale(g, r, Q.qrange(b, True)[1], hint)
            c = _clip_round(g, g.op("Div", [x, s], hint + ".div"), -half, half - 1, hint)
            return Codes(g.op("Cast", [c], hint + ".codes", to=INT8), s, None, True)
        hi = g.reduce("ReduceMax", x, axes, hint + ".max")
        if qm.range_mode == "nonneg":
            hi = g.op("Max", [hi, g.const(0.0)], hint + ".max0")
            r, zp, offset = hi, g.const(-float(half)), None
        else:
            lo = g.reduce("ReduceMin", x, axes, hint + ".min")
            r = g.op("Sub", [hi, lo], hint + ".range")
        s = _safe_scale(g, r, Q.qrange(b, False)[1], hint)
        if qm.range_mode != "nonneg":
            neg_lo = g.op("Neg", [lo], hint + ".neg_min")
            zp = g.op("Sub", [g.op("Div", [neg_lo, s], hint + ".zp_raw"), g.const(float(half))], hint + ".zp")
            offset = g.op("Mul", [g.op("Neg", [s], hint + ".neg_scale"),
                                  g.op("Add", [zp, g.const(float(half))], hint + ".zp_half")], hint + ".offset")
        scaled = g.op("Add", [g.op("Div", [x, s], hint + ".div"), zp], hint + ".shifted")
        c = _clip_round(g, scaled, -half, half - 1, hint)
        u = g.op("Add", [c, g.const(float(half))], hint + ".levels")
        return Codes(g.op("Cast", [u], hint + ".codes", to=UINT8), s, offset, True)
    qn, qp = Q.qrange(b, signed)
    if m == "lsq":
        s = np.asarray(Q.positive_step(jnp.asarray(qm.step[...], jnp.float32)))
        y, lo = x, None if signed else np.asarray(qm.offset[...], np.float32)
    elif m == "pact":
        lo, hi = (np.asarray(v) for v in Q.clip_bounds(jnp.asarray(qm.lo[...], jnp.float32),
                                                       jnp.asarray(qm.hi[...], jnp.float32)))
        y = g.op("Min", [g.op("Max", [x, g.const(lo)], hint + ".clip_lo"), g.const(hi)], hint + ".clipped")
        s = np.asarray(Q.clip_scale(jnp.asarray(lo), jnp.asarray(hi), b, signed))
        lo = None if signed else lo
    else:
        raise ValueError(f"ONNX export: {m!r} is not an activation quantizer this exporter knows "
                         "(uniform, lsq, pact)")
    s_name = g.const(s)
    if signed:
        c = _clip_round(g, g.op("Div", [y, s_name], hint + ".div"), qn, qp, hint)
        return Codes(g.op("Cast", [c], hint + ".codes", to=INT8), s_name, None, False)
    lo_name = g.const(lo)
    shifted = g.op("Div", [g.op("Sub", [y, lo_name], hint + ".centred"), s_name], hint + ".div")
    u = _clip_round(g, shifted, 0, qp, hint)
    return Codes(g.op("Cast", [u], hint + ".codes", to=UINT8), s_name, lo_name, False)


def dequantized(g: Graph, codes: Codes, hint: str) -> str:
    """``scale * codes + offset`` in float32 (the fake-quantized activation)."""
    y = g.op("Mul", [g.op("Cast", [codes.codes], hint + ".codes_f", to=FLOAT), codes.scale], hint + ".dequant")
    return y if codes.offset is None else g.op("Add", [y, codes.offset], hint + ".dequant_off")


def int8_linear(g: Graph, mod, x: str, ndim: int, hint: str, key) -> str:
    """An `IntLinear` without group scales: ``MatMulInteger`` on the activation codes and the
    int8 weight codes, then the float rescaling of the module docstring."""
    c = activation_codes(g, mod.input_quant, x, ndim, hint + ".in")
    w = g.weight(np.asarray(mod.w_codes[...], np.int8), hint + ".w_codes", key=(key, "codes"))
    acc = g.op("MatMulInteger", [c.codes, w], hint + ".acc")
    y = g.op("Mul", [g.op("Cast", [acc], hint + ".acc_f", to=FLOAT), c.scale], hint + ".rescale_x")
    if c.offset is not None:
        colsum = g.weight(np.asarray(mod.w_colsum[...], np.float32), hint + ".w_colsum", key=(key, "colsum"))
        y = g.op("Add", [y, g.op("Mul", [c.offset, colsum], hint + ".offset_term")], hint + ".with_offset")
    s_w = g.weight(np.asarray(mod.w_scale[...], np.float32), hint + ".w_scale", key=(key, "scale"))
    y = g.op("Mul", [y, s_w], hint + ".rescale_w")
    if mod.bias is not None:
        b = g.weight(np.asarray(mod.bias[...], np.float32), hint + ".bias", key=(key, "bias"))
        y = g.op("Add", [y, b], hint + ".out")
    return y


def _int_product(g: Graph, left: Codes, right: str, hint: str, *, keep_zeros_of: str | None = None) -> str:
    """``s_l * (codes_l @ right) + offset_l * (1 @ right)`` for int8 ``right`` codes (batched);
    ``keep_zeros_of``: the float left operand whose exact zeros count as 0, not as the grid's
    offset (masked attention probabilities, `quant.IntAttention`)."""
    codes, colsum = left.codes, None
    if left.offset is not None and keep_zeros_of is not None:
        nonzero = g.op("Not", [g.op("Equal", [keep_zeros_of, g.const(0.0)], hint + ".zero")], hint + ".nonzero")
        codes = g.op("Where", [nonzero, codes, g.const(0, np.uint8)], hint + ".masked_codes")
        ones = g.op("Cast", [nonzero], hint + ".ones", to=UINT8)
        colsum = g.op("MatMulInteger", [ones, right], hint + ".colsum")
    elif left.offset is not None:
        colsum = g.reduce("ReduceSum", g.op("Cast", [right], hint + ".right_i32", to=INT32), [-2], hint + ".colsum")
    acc = g.op("MatMulInteger", [codes, right], hint + ".acc")
    y = g.op("Mul", [g.op("Cast", [acc], hint + ".acc_f", to=FLOAT), left.scale], hint + ".rescale")
    if left.offset is not None:
        colsum = g.op("Cast", [colsum], hint + ".colsum_f", to=FLOAT)
        y = g.op("Add", [y, g.op("Mul", [left.offset, colsum], hint + ".offset_term")], hint + ".with_offset")
    return y


def _transposed_scale(g: Graph, codes: Codes, hint: str) -> str:
    """A right operand's keepdims scale [B,N,S,1] as [B,N,1,S] (constants as they are)."""
    return g.op("Transpose", [codes.scale], hint, perm=[0, 1, 3, 2]) if codes.dynamic else codes.scale


def int_scores(g: Graph, iq, q: str, k: str, hint: str) -> str:
    """`IntAttention.scores`: q [B,N,T,D], k [B,N,S,D] -> int8 ``q @ k^T`` rescaled [B,N,T,S]."""
    cq = activation_codes(g, iq.q, q, 4, hint + ".q")
    ck = activation_codes(g, iq.k, k, 4, hint + ".k")
    kt = g.op("Transpose", [ck.codes], hint + ".kT", perm=[0, 1, 3, 2])
    y = _int_product(g, cq, kt, hint + ".qk")
    return g.op("Mul", [y, _transposed_scale(g, ck, hint + ".k_scale_T")], hint + ".scores")


def int_context(g: Graph, iq, probs: str, v: str, hint: str) -> str:
    """`IntAttention.context`: probs [B,N,T,S], v [B,N,S,D] -> [B,N,T,D]; with ``fold`` the
    per-token ``v`` scales multiply the probabilities before they are quantized."""
    cv = activation_codes(g, iq.v, v, 4, hint + ".v")
    if iq.fold:
        weighted = g.op("Mul", [probs, _transposed_scale(g, cv, hint + ".v_scale_T")], hint + ".weighted")
        cp = activation_codes(g, iq.probs, weighted, 4, hint + ".p")
        return _int_product(g, cp, cv.codes, hint + ".pv", keep_zeros_of=weighted)
    cp = activation_codes(g, iq.probs, probs, 4, hint + ".p")
    y = _int_product(g, cp, cv.codes, hint + ".pv", keep_zeros_of=probs)
    return g.op("Mul", [y, cv.scale], hint + ".context")


__all__ = ["Codes", "activation_codes", "dequantized", "int8_linear", "int_scores", "int_context"]
