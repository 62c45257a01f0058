"""Integer inference: int8 x int8 -> int32 matmuls (``jax.lax.dot_general``) with rescaling.

    imodel, report = quant.to_integer_model(qmodel)     # qmodel: fake-quantized (quantize_model)
    print(report)                                      # which sites run in integers
    logits = imodel(ids, mask).logits                  # same predictions as qmodel

Every `QuantLinear` with a signed weight quantizer (uniform, LSQ, PACT at 2..8 bits, TWN, BWN:
W8, W4, W2, ternary and binary weights all become int8 codes) and an activation quantizer of at
most 8 bits (W8A8, W4A8, W2A8, ...) becomes an `IntLinear`:

* weights: int8 codes ``d`` and scales ``s_w`` (per tensor, per output channel or per group of
  ``g`` input rows and output channel) from `efficient_nlp.quant.export.weight_codes`, computed
  once (no per-call weight quantization);
* inputs: quantized per call to int8 codes ``c`` with the same quantizer parameters as fake
  quantization (the per-token or per-example range of ``uniform``: ``s_x`` and ``offset`` are
  keepdims arrays with one entry per token / example, which factor out of the product over the
  features; or the learned LSQ step / LSQ+ offset / PACT clip values):
  ``x_hat = s_x * (c + shift) + offset`` (symmetric: ``shift = 0``, no offset;
  asymmetric: ``shift = 2^(b-1)`` gives the unsigned level, ``offset`` = the grid's minimum, i.e.
  ``-s_x * (zero_point + 2^(b-1))`` for uniform, the LSQ+ offset, PACT's ``lo``);
* ``acc = dot_general(c, d, preferred_element_type=int32) + shift * sum_k d_k`` (exact integer
  arithmetic), then ``y = s_w * (s_x * acc + offset * sum_k d_k) + bias`` -- the zero-point
  correction of the codes convention in `efficient_nlp.quant.quantizers`, arranged so that
  the float terms do not cancel (the shift is applied in int32).
* group-wise weight scales (``W4A8 g128``): the product runs per group, ``acc_G = c_G @ d_G``
  (int8 x int8 -> int32 over the ``g`` inputs of group ``G``, `group_int8_matmul`), each group's
  term is rescaled as above with its own ``s_w[G]`` in float32 and the groups are summed.

The result differs from the fake-quant float matmul only by float rounding (the fake path sums
float products; here the sum is exact), so logits agree to ~1e-5 relative and predictions agree
except on rounding ties.  `QuantLinear` sites with float inputs (weight-only) keep their int8
codes and dequantize them per call (`DequantLinear`, also with group scales: W4A16 g128);
`QuantEmbed` tables become int8 codes whose gathered rows are dequantized (`IntEmbed`), exactly
the fake-quant values.  The attention's
activation-activation matmuls (``q.k^T``, ``probs.v``) run the same int8 products batched over
(batch, head) (`IntAttention`) when all four operands are quantized, with per-token ``v`` scales
folded into the probabilities as in `AttentionQuant`.  Unsigned (asymmetric) weight grids stay
fake-quantized.  All quantizer arithmetic (ranges, scales, codes) is float32 whatever the
input dtype, as in fake quantization, so a bfloat16 model gets the codes of its QAT forward.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp import train
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.export import dequantize_weight, weight_codes
from efficient_nlp.quant.spec import METHODS
from efficient_nlp.quant.transform import _replace, quantizer_modules


class IntCodes(nnx.Variable):
    """Integer weight codes and their scales (not trained: no ``nnx.Param``)."""


def activation_codes(qm: M.QuantizerModule, x):
    """``(codes int8, s_x, offset, shift)`` with ``qm(x) == s_x * (codes + shift) + offset`` up to
    float rounding (``shift = 2^(b-1)`` turns the int8 codes of an unsigned grid back into its
    levels ``u in [0, 2^b - 1]``; ``offset`` is None and ``shift`` 0 for symmetric grids and for
    the ``[0, max]`` grid of ``range_mode="nonneg"``).  Same grid, range (per token / example:
    keepdims ``s_x`` and ``offset``) and rounding as the fake-quant forward of ``qm``, in float32
    whatever ``x``'s dtype; learned steps and clip values are used as the forward uses them
    (`quantizers.positive_step`, `quantizers.clip_bounds`)."""
    q = qm.quantizer
    m, b, signed = q.method, q.bits, q.signed
    x = jnp.asarray(x, jnp.float32)
    if not qm.calibrated:
        raise RuntimeError(f"activation quantizer {q.name} is not calibrated; run quant.calibrate first")
    half = 0 if signed else 2 ** (b - 1)
    if m == "uniform":
        s, zp = qm.uniform_params(x)
        codes = Q.quantize_codes(x, s, zp, b, signed)
        # s * (codes - zp) = s * (codes + half) - s * (zp + half); -s * (zp + half) is min(x).
        offset = None if signed or qm.range_mode == "nonneg" else -s * (zp + half)
        return codes, s, offset, half
    if m == "lsq":
        s = Q.positive_step(jnp.asarray(qm.step[...], x.dtype))
        y, offset = x, (None if signed else jnp.asarray(qm.offset[...], x.dtype))
    elif m == "pact":
        lo, hi = Q.clip_bounds(jnp.asarray(qm.lo[...], x.dtype), jnp.asarray(qm.hi[...], x.dtype))
        y = jnp.minimum(jnp.maximum(x, lo), hi)
        s = Q.clip_scale(lo, hi, b, signed)
        offset = None if signed else lo
    else:
        raise ValueError(f"activation_codes: {m!r} is not an activation quantizer")
    qn, qp = Q.qrange(b, signed)
    if signed:
        return jnp.clip(jnp.round(y / s), qn, qp).astype(jnp.int8), s, None, 0
    codes = (jnp.clip(jnp.round((y - offset) / s), 0, qp) - half).astype(jnp.int8)
    return codes, s, offset, half


def int8_matmul(x_codes, w_codes):
    """``x_codes [..., K] @ w_codes [K, N]`` in int8 with int32 accumulation."""
    return jax.lax.dot_general(x_codes, w_codes, (((x_codes.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)


def group_int8_matmul(x_codes, w_codes):
    """Per-group int8 products: ``x_codes [..., G, g]`` and ``w_codes [G, g, N]`` ->
    ``[..., G, N]`` int32, entry ``G`` being ``x_codes[..., G, :] @ w_codes[G]``."""
    lead = x_codes.ndim - 2
    acc = jax.lax.dot_general(x_codes, w_codes, (((x_codes.ndim - 1,), (1,)), ((lead,), (0,))),
                              preferred_element_type=jnp.int32)  # [G, ..., N]
    return jnp.moveaxis(acc, 0, -2)


def _scale_vector(scale):
    """A weight scale as something that broadcasts over ``[..., out]`` (0-d and keepdims
    ``[1, out]``) or over ``[..., G, out]`` (group scales ``[G, 1, out]`` -> ``[G, out]``)."""
    if scale.ndim == 3:
        return scale[:, 0, :]
    return scale.reshape(-1) if scale.ndim else scale


class IntLinear(nnx.Module):
    """``y = s_w * (s_x * (c @ d + shift * colsum(d)) + offset * colsum(d)) + bias`` with an int8
    ``c @ d`` accumulated in int32 (see the module docstring); with group-wise weight scales the
    bracket is computed per group ``G`` of ``g`` inputs and ``y = sum_G s_w[G] * (...)_G + bias``."""

    def __init__(self, qlinear: M.QuantLinear):
        wq = qlinear.weight_quant
        c = weight_codes(wq, qlinear.kernel[...])
        q = wq.quantizer
        self.group_size = q.group_size if q.granularity == "group" else 0
        d = Q.group_view(c["codes"], self.group_size) if self.group_size else c["codes"]  # [G, g, out]
        self.w_codes = IntCodes(d)
        self.w_scale = IntCodes(_scale_vector(c["scale"]))
        self.w_colsum = IntCodes(jnp.sum(d.astype(jnp.int32), axis=-2))  # [out] or [G, out]
        self.bias = qlinear.bias
        self.input_quant = qlinear.input_quant
        self.site = qlinear.site
        self.w_bits, self.a_bits = q.bits, qlinear.input_quant.quantizer.bits
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features

    def __call__(self, x):
        codes, s_x, offset, shift = activation_codes(self.input_quant, x)
        if self.group_size:
            grouped = codes.reshape(codes.shape[:-1] + (-1, self.group_size))  # [..., G, g]
            acc = group_int8_matmul(grouped, self.w_codes[...])                 # [..., G, out]
        else:
            acc = int8_matmul(codes, self.w_codes[...])
        if shift:  # unsigned levels u = codes + shift: sum_k u_k d_k, exactly, in int32
            acc = acc + shift * self.w_colsum[...]
        if self.group_size:  # per-token s_x / offset [..., 1] broadcast over [..., G, out]
            s_x = s_x[..., None]
            offset = None if offset is None else offset[..., None]
        y = acc.astype(jnp.float32) * s_x
        if offset is not None:
            y = y + offset * self.w_colsum[...].astype(jnp.float32)
        y = y * self.w_scale[...]
        if self.group_size:
            y = jnp.sum(y, axis=-2)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _to_output(a, w_axis: int):
    """A keepdims array over ``w`` [batch..., S, D] (colsum, scale: size 1 on the contracted
    ``w_axis``) laid out to broadcast over the product [batch..., T, w's free axis]: the
    contracted axis moves to the position of x's free axis, second to last."""
    if jnp.ndim(a) < 2:
        return a
    return jnp.moveaxis(a, w_axis, -2)


def _int_product(x, xq: M.QuantizerModule, w, wq: M.QuantizerModule, dims, *, codes=None,
                 keep_zeros=False):
    """``Q(x) . Q(w)`` over ``dims`` (a ``dot_general`` dimension spec contracting x's last axis)
    as an int8 x int8 -> int32 product rescaled like `IntLinear` (``w`` on a signed grid whose
    scale is constant along the contracted axis; ``colsum`` of w's codes over the contracted
    axis gives the zero-point terms).  ``codes``: w's ``(codes, scale)`` when already known.
    ``keep_zeros``: exact zeros of ``x`` count as 0, not as the grid's offset (the attention
    probabilities of masked keys, `AttentionQuant.quantized_probs`): with the 0/1 mask ``m``
    of the non-zero entries, ``sum_k m_k (c_k + shift) d_k = (m c) . d + shift * (m . d)`` and
    the offset term is ``offset * (m . d)`` (a second int8 product)."""
    c, s_x, offset, shift = activation_codes(xq, x)
    d, s_w = codes if codes is not None else activation_codes(wq, w)[:2]
    (_, (w_axis,)), _ = dims
    masked = keep_zeros and offset is not None
    if masked:
        nonzero = jnp.asarray(x) != 0
        c = jnp.where(nonzero, c, jnp.zeros_like(c))
        colsum = jax.lax.dot_general(nonzero.astype(jnp.int8), d, dims, preferred_element_type=jnp.int32)
    acc = jax.lax.dot_general(c, d, dims, preferred_element_type=jnp.int32)
    if shift or offset is not None:
        if not masked:
            colsum = _to_output(jnp.sum(d.astype(jnp.int32), axis=w_axis, keepdims=True), w_axis)
        if shift:
            acc = acc + shift * colsum
    y = acc.astype(jnp.float32) * s_x
    if offset is not None:
        y = y + offset * colsum.astype(jnp.float32)
    return y * _to_output(s_w, w_axis)


class IntAttention(nnx.Module):
    """The attention's ``q.k^T`` and ``probs.v`` as int8 x int8 -> int32 batched matmuls (the
    ``matmul_quant`` hook), with the same quantizers as the fake-quant `AttentionQuant`: per-token
    ``q`` / ``k`` scales rescale the rows / columns of the int32 scores; per-token ``v`` scales
    are folded into the probabilities before they are quantized (``AttentionQuant.fold_v``)."""

    def __init__(self, aq: M.AttentionQuant):
        self.site = aq.site
        self.q, self.k, self.v, self.probs = aq.q, aq.k, aq.v, aq.probs
        self.fold = aq.fold_v()

    def scores(self, q, k):
        """q [B,N,T,D], k [B,N,S,D] -> [B,N,T,S]."""
        return _int_product(q, self.q, k, self.k, (((3,), (3,)), ((0, 1), (0, 1))))

    def context(self, probs, v):
        """probs [B,N,T,S], v [B,N,S,D] -> [B,N,T,D]."""
        dims = (((3,), (2,)), ((0, 1), (0, 1)))
        if not self.fold:
            return _int_product(probs, self.probs, v, self.v, dims, keep_zeros=True)
        d, s_v, _, _ = activation_codes(self.v, v)                       # s_v [B,N,S,1]
        weighted = jnp.asarray(probs, jnp.float32) * jnp.swapaxes(s_v, -1, -2)
        return _int_product(weighted, self.probs, v, self.v, dims, codes=(d, jnp.ones((), jnp.float32)),
                            keep_zeros=True)


def _int_attention_ok(aq: M.AttentionQuant) -> bool:
    """Both operands of both matmuls quantized, the right-hand ones on signed grids."""
    mods = (aq.q, aq.k, aq.v, aq.probs)
    return (all(m is not None and m.quantizer.bits <= 8 for m in mods)
            and aq.k.quantizer.signed and aq.v.quantizer.signed)


class DequantLinear(nnx.Module):
    """A weight-only quantized Linear: int8 codes dequantized per call, float matmul (the same
    values as the fake-quant weight; for sites whose input is not quantized)."""

    def __init__(self, qlinear: M.QuantLinear):
        wq = qlinear.weight_quant
        c = weight_codes(wq, qlinear.kernel[...])
        self.quantizer = wq.quantizer
        self.codes = IntCodes(c["codes"])
        self.scale = IntCodes(c["scale"])
        self.zero_point = None if c["zero_point"] is None else IntCodes(c["zero_point"])
        self.offset = None if c["offset"] is None else IntCodes(c["offset"])
        self.bias = qlinear.bias
        self.input_quant = qlinear.input_quant
        self.site = qlinear.site

    def __call__(self, x):
        w = dequantize_weight(self.quantizer, self.codes[...], self.scale[...],
                              None if self.zero_point is None else self.zero_point[...],
                              None if self.offset is None else self.offset[...])
        x = jnp.asarray(x, w.dtype) if self.input_quant is None else self.input_quant(jnp.asarray(x, w.dtype))
        y = jnp.dot(x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class IntEmbed(M.TiedTable, nnx.Module):
    """An int8 code table; the gathered rows are dequantized (the fake-quant values exactly)."""

    def __init__(self, qembed: M.QuantEmbed, half: str = ""):
        """``half``: ``"1"`` / ``"2"`` converts that half of a `SplitEmbed` (``embedding<half>``,
        ``weight_quant<half>``)."""
        wq = getattr(qembed, "weight_quant" + half)
        c = weight_codes(wq, getattr(qembed, "embedding" + half)[...])
        self.quantizer = wq.quantizer
        self.rowwise = c["scale"].ndim > 0  # per-row scales [V, 1] are gathered with the codes
        self.codes = IntCodes(c["codes"])
        self.scale = IntCodes(c["scale"])
        self.zero_point = None if c["zero_point"] is None else IntCodes(c["zero_point"])
        self.offset = None if c["offset"] is None else IntCodes(c["offset"])
        self.dtype = qembed.dtype
        self.site = qembed.site

    def __call__(self, ids):
        ids = jnp.asarray(ids)

        def rows(v):
            if v is None:
                return None
            v = v[...]
            return jnp.take(v, ids, axis=0) if self.rowwise else v

        out = dequantize_weight(self.quantizer, jnp.take(self.codes[...], ids, axis=0), rows(self.scale),
                                rows(self.zero_point), rows(self.offset))
        return out if self.dtype is None else out.astype(self.dtype)

    def table(self):
        """The whole dequantized table [V, E] (for a tied LM head)."""
        out = dequantize_weight(self.quantizer, self.codes[...], self.scale[...],
                                None if self.zero_point is None else self.zero_point[...],
                                None if self.offset is None else self.offset[...])
        return out if self.dtype is None else out.astype(self.dtype)


class IntSplitLinear(nnx.Module):
    """A ternary-weight-split Linear (`efficient_nlp.quant.splitting.SplitLinear`, BinaryBERT) as
    ONE int8 matmul against its two binary halves side by side: ``acc = c @ [d1 | d2]`` (int32,
    the full-width binary layer), ``y = s_x * (s_1 * acc[:, :N] + s_2 * acc[:, N:]) + bias``, with
    the zero-point terms of `IntLinear` per half."""

    def __init__(self, split):
        codes = [weight_codes(getattr(split, "weight_quant" + h), getattr(split, "kernel" + h)[...])
                 for h in ("1", "2")]
        d = jnp.concatenate([c["codes"] for c in codes], axis=1)
        self.w_codes = IntCodes(d)
        self.w_colsum = IntCodes(jnp.sum(d.astype(jnp.int32), axis=0))
        self.w_scales = IntCodes(jnp.stack([jnp.broadcast_to(_scale_vector(c["scale"]), (split.out_features,))
                                            for c in codes]))
        self.bias = split.bias
        self.input_quant = split.input_quant
        self.site = split.site
        self.out_features = split.out_features

    def __call__(self, x):
        codes, s_x, offset, shift = activation_codes(self.input_quant, x)
        acc = int8_matmul(codes, self.w_codes[...])
        if shift:
            acc = acc + shift * self.w_colsum[...]
        y = acc.astype(jnp.float32) * s_x
        if offset is not None:
            y = y + offset * self.w_colsum[...].astype(jnp.float32)
        n, scales = self.out_features, self.w_scales[...]
        y = y[..., :n] * scales[0] + y[..., n:] * scales[1]
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class IntSplitEmbed(M.TiedTable, nnx.Module):
    """A ternary-weight-split embedding (`SplitEmbed`): two int8 (binary) code tables; the gathered
    rows of both are dequantized and summed (the fake-quant values exactly)."""

    def __init__(self, split):
        self.half1, self.half2 = IntEmbed(split, "1"), IntEmbed(split, "2")
        self.site = split.site

    def __call__(self, ids):
        return self.half1(ids) + self.half2(ids)

    def table(self):
        return self.half1.table() + self.half2.table()


@dataclasses.dataclass
class IntegerReport:
    """``rows`` of (site, what it became, why)."""

    rows: list

    @property
    def integer_sites(self) -> list[str]:
        return [s for s, kind, _ in self.rows if kind == "int8 matmul"]

    def __str__(self):
        width = max([len(r[0]) for r in self.rows] + [4])
        lines = [f"integer model: {len(self.integer_sites)} of {len(self.rows)} quantized sites run int8 matmuls"]
        lines += [f"{site:<{width}}  {kind:<18}  {why}" for site, kind, why in self.rows]
        return "\n".join(lines)


def to_integer_model(qmodel):
    """``(imodel, IntegerReport)``: a copy of the fake-quantized ``qmodel`` whose quantized Linear
    layers run int8 matmuls and whose quantized embeddings hold int8 codes (see module doc).
    ``qmodel`` is not changed; a model restored by `efficient_nlp.quant.restore` works too
    (re-quantizing the restored values gives the same codes)."""
    registered = sorted({f"{path} ({qm.quantizer.method})" for path, qm in quantizer_modules(qmodel)
                         if qm.quantizer.method not in METHODS})
    if registered:
        raise ValueError(f"to_integer_model: registered quantizers have no integer codes (fake quantization "
                         f"only): {registered[:4]}; the integer model knows the built-in methods {METHODS}")
    from efficient_nlp.quant.splitting import SplitEmbed, SplitLinear

    model = train.copy_model(qmodel)
    rows = []
    for path, mod in [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, (SplitLinear, SplitEmbed))]:
        if isinstance(mod, SplitEmbed):
            _replace(model, path, IntSplitEmbed(mod))
            rows.append((mod.site, "int8 table", "split: two binary tables, rows dequantized on gather"))
        elif mod.input_quant is None or mod.input_quant.quantizer.bits > 8:
            rows.append((mod.site, "fake quant", "split with a float input"))
        else:
            _replace(model, path, IntSplitLinear(mod))
            rows.append((mod.site, "int8 matmul", f"split: two binary halves, A{mod.input_quant.quantizer.name}"))
    found = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, (M.QuantLinear, M.QuantEmbed))]
    for path, mod in found:
        wq = mod.weight_quant
        if wq is None:
            rows.append((mod.site, "fake quant", "float weight"))
            continue
        # A frozen (restored) weight quantizer passes values through: weight_codes re-derives codes.
        if isinstance(mod, M.QuantEmbed):
            _replace(model, path, IntEmbed(mod))
            rows.append((mod.site, "int8 table", f"{wq.quantizer.name} rows dequantized on gather"))
            continue
        if not wq.quantizer.signed and wq.quantizer.method not in ("twn", "bwn"):
            rows.append((mod.site, "fake quant", "asymmetric weight grid"))
            continue
        aq = mod.input_quant
        if aq is None:
            _replace(model, path, DequantLinear(mod))
            rows.append((mod.site, "int8 weight", "float input: codes dequantized per call"))
        else:
            _replace(model, path, IntLinear(mod))
            rows.append((mod.site, "int8 matmul", f"W{wq.quantizer.name} A{aq.quantizer.name}"))
    for _, mod in nnx.iter_modules(model):
        aq = getattr(mod, "matmul_quant", None)
        if isinstance(aq, M.AttentionQuant):
            if _int_attention_ok(aq):
                mod.matmul_quant = nnx.data(IntAttention(aq))
                rows.append((aq.site, "int8 matmul", "q.k^T and probs.v"))
            else:
                rows.append((aq.site, "fake quant", "an attention operand is float or unsigned on the right"))
    return model, IntegerReport(rows)


__all__ = ["IntCodes", "IntLinear", "group_int8_matmul", "IntSplitLinear", "IntSplitEmbed", "IntAttention", "DequantLinear", "IntEmbed", "IntegerReport", "activation_codes",
           "int8_matmul", "to_integer_model"]
