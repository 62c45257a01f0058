"""ONNX emitters of the static int8 model's sites (`efficient_nlp.quant.to_static_int8`) in the
QDQ form ONNX Runtime fuses into its integer kernels.

A `StaticLinear` becomes

    x -> [Clip(lo, hi) | Sub(lo)] -> QuantizeLinear(s_x, zp) -> DequantizeLinear(s_x, zp) --\\
    w_codes (int8 initializer) -> DequantizeLinear(s_w per output column, axis=1) ---------> MatMul -> Add(bias')

and ONNX Runtime's graph optimizer (the QDQ selector/action transformer, level "extended" and
above) replaces ``DQ -> MatMul <- DQ`` by ``MatMulIntegerToFloat``: the uint8 x int8 -> int32
product of the codes rescaled by ``s_x * s_w``.  The activation grid is exactly the one of our
static quantizer (`efficient_nlp.quant.integer.activation_codes`):

* signed grid, codes ``c = clip(round(y / s), -2^(b-1), 2^(b-1) - 1)`` with ``y = x`` (LSQ) or
  ``y = clip(x, lo, hi)`` (PACT; the ``Clip`` is emitted because the PACT range is in general
  narrower than the code range): ``QuantizeLinear`` to **uint8 with zero point 2^(b-1)**,
  i.e. the levels ``c + 2^(b-1)`` -- the same codes, carried as the unsigned operand the x86
  ``u8 x s8`` integer kernels take natively;
* unsigned grid ``x_hat = lo + s * u``, ``u = clip(round((clip(x, lo, hi) - lo) / s), 0, Qp)``
  (PACT; LSQ+ with its learned offset as ``lo``): ``Sub(x, lo)`` then ``QuantizeLinear`` to
  uint8 with zero point 0 (its saturation at 0 and ``Qp = (hi - lo) / s`` is PACT's clip).  A
  zero point cannot carry ``lo`` exactly (``-lo / s`` is not an integer in general), so the
  offset is folded into the bias instead: ``(lo + s u) @ W = s u @ W + lo * colsum(W)``, and
  ``bias' = bias + lo * colsum(d) * s_w`` (`StaticLinear`'s constant term).

Grids of fewer than 8 bits are carried in the 8-bit containers the same way, with a ``Clip``
to the grid's range (`_clip_bounds`) where the container's saturation is wider.

``QuantizeLinear`` divides by the scale (IEEE float32 division) and rounds half to even, as
``jnp.round`` does, so the codes are those of the grid formula exactly.  Our JAX model may
compute ``x / s`` as ``x * (1/s)`` (XLA:CPU does), which differs in the last bit for some
values: a value within an ulp of a rounding tie can then get the neighbouring code -- rarer than
the code changes the float rounding of the ops before a quantizer (LayerNorm, softmax, GELU)
causes anyway.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from efficient_nlp.deploy.onnx_graph import Graph
from efficient_nlp.quant import quantizers as Q


def _scalar(value, what: str, site: str) -> np.float32:
    arr = np.asarray(value, np.float32)
    if arr.size != 1:
        raise ValueError(f"ONNX QDQ export: the {what} of the activation quantizer at {site} has shape {arr.shape}; "
                         "QuantizeLinear here takes one static scale per tensor")
    return np.float32(arr.reshape(()))


def static_grid(qm, site: str) -> tuple[np.float32, np.float32 | None, np.float32 | None, bool]:
    """``(s, lo, hi, signed)`` of a calibrated static (``lsq`` / ``pact``) activation quantizer:
    PACT's ordered clip range (`quantizers.clip_bounds`) and step (`quantizers.clip_scale`), LSQ's
    positive step (`quantizers.positive_step`) and LSQ+'s offset as ``lo`` (``hi`` None)."""
    q = qm.quantizer
    if not qm.calibrated:
        raise RuntimeError(f"activation quantizer {q.name} at {site} is not calibrated; run quant.calibrate first")
    if q.method == "lsq":
        s = _scalar(Q.positive_step(jnp.asarray(qm.step[...], jnp.float32)), "step", site)
        lo = None if q.signed else _scalar(qm.offset[...], "offset", site)
        return s, lo, None, q.signed
    if q.method == "pact":
        lo, hi = Q.clip_bounds(jnp.asarray(qm.lo[...], jnp.float32), jnp.asarray(qm.hi[...], jnp.float32))
        s = _scalar(Q.clip_scale(lo, hi, q.bits, q.signed), "clip range", site)
        return s, _scalar(lo, "clip range", site), _scalar(hi, "clip range", site), q.signed
    raise ValueError(f"ONNX QDQ export: the activation quantizer at {site} is {q.name} ({q.method}); QDQ needs a "
                     "static scale (lsq or pact), dynamic ranges are exported as ops (quant.to_integer_model)")


def _clip_bounds(s, lo, hi, signed: bool, bits: int):
    """The ``Clip`` of ``x`` before ``QuantizeLinear`` (None: none needed): PACT's signed range
    (narrower than the codes' in general); with fewer than 8 bits the grid's own range, which
    the uint8 container's saturation does not give: ``[Qn s, Qp s]`` (LSQ), ``[lo, lo + Qp s]``
    (LSQ+), ``[lo, hi]`` (PACT).  ``x`` clipped to ``[Qn s, Qp s]`` rounds to the codes
    ``clip(round(x / s), Qn, Qp)``."""
    qn, qp = Q.qrange(bits, signed)
    if signed and hi is not None:
        return lo, hi
    if bits >= 8:
        return None
    if signed:
        return np.float32(qn * s), np.float32(qp * s)
    return lo, (np.float32(lo + qp * s) if hi is None else hi)


def quantize_dequantize(g: Graph, qm, x: str, hint: str) -> tuple[str, np.float32 | None, str]:
    """``(x_dq, lo, note)``: ``x_dq = s * levels`` from a ``QuantizeLinear`` -> ``DequantizeLinear``
    pair on our grid (module docstring), so that ``qm(x) = x_dq + lo`` (``lo`` None: 0) up to
    float rounding; ``note`` describes the carrier for the export report."""
    s, lo, hi, signed = static_grid(qm, hint)
    bits = qm.quantizer.bits
    bounds = _clip_bounds(s, lo, hi, signed, bits)
    y = x if bounds is None else g.op("Clip", [x, g.const(bounds[0]), g.const(bounds[1])], hint + ".clip")
    if signed:
        zp, lo, grid = np.asarray(2 ** (bits - 1), np.uint8), None, "signed"
    else:
        y = g.op("Sub", [y, g.const(lo)], hint + ".centred")
        zp, grid = np.asarray(0, np.uint8), "unsigned, offset in the bias"
    s_name, zp_name = g.const(s), g.const(zp, np.uint8)
    codes = g.op("QuantizeLinear", [y, s_name, zp_name], hint + ".codes")
    note = f"{qm.quantizer.name} {grid}: uint8 zp={int(zp)}"
    return g.op("DequantizeLinear", [codes, s_name, zp_name], hint + ".dequant"), lo, note


def int8_weight_codes(mod) -> np.ndarray:
    """`StaticLinear`'s weight codes as int8 (whatever carrier holds them; checked integral)."""
    w = np.asarray(jnp.asarray(mod.w_codes[...]).astype(jnp.float32))
    if not (np.array_equal(w, np.round(w)) and np.abs(w).max(initial=0) <= 127):
        raise ValueError(f"ONNX QDQ export: the weight codes of {mod.sites[0]} are not int8 integers")
    return w.astype(np.int8)


def static_linear(g: Graph, mod, x: str, hint: str, key) -> tuple[str, str]:
    """A `StaticLinear` (one product, its sites' kernels side by side) as QDQ + ``MatMul`` +
    bias ``Add`` (module docstring); returns ``(output name, report note)``."""
    x_dq, lo, note = quantize_dequantize(g, mod.input_quant, x, hint + ".in")
    s_w = np.asarray(mod.w_scale[...], np.float32)
    w_dq = g.op("DequantizeLinear", [g.weight(int8_weight_codes(mod), hint + ".w_codes", key=(key, "codes")),
                                     g.weight(s_w, hint + ".w_scale", key=(key, "scale"))], hint + ".w", axis=1)
    bias = np.asarray(mod.bias[...], np.float32)
    if lo is not None:  # StaticLinear's constant: bias + offset * colsum * s_w, in float32
        bias = bias + lo * np.asarray(mod.w_colsum[...], np.float32) * s_w
    if len(mod.sites) > 1:
        note += f"; one product of {len(mod.sites)} sites"
    y = g.op("MatMul", [x_dq, w_dq], hint + ".matmul")
    return g.op("Add", [y, g.weight(bias.astype(np.float32), hint + ".bias", key=(key, "bias"))], hint + ".out"), note


__all__ = ["int8_weight_codes", "quantize_dequantize", "static_grid", "static_linear"]
