"""Fake-quantized NNX modules (a simulation: values on the low-bit grid, stored in float).

`QuantLinear` / `QuantEmbed` take over the parameters of an ``nnx.Linear`` / ``nnx.Embed`` (same
Variable objects, same names: ``...query.kernel`` stays ``...query.kernel``) and quantize the
weight (and the Linear's input) with straight-through gradients on every call, so the latent
full-precision weights are what the optimizer updates (QAT, docs/quantization.md).  `AttentionQuant`
is plugged into the attention module's ``matmul_quant`` hook and quantizes the inputs of the two
activation-activation matmuls (q.k^T and probs.v).  Learned quantizer state (LSQ step and
offset, PACT clip values) are ``nnx.Param`` under ``<module>.weight_quant`` /
``<module>.input_quant``.

Activation ranges are per token (or per example), never across a batch: a row's output does not
depend on the other rows of its batch, and per token not on its padding either
(docs/quantization.md, "Activation ranges").  Quantizer arithmetic runs in float32 and the
fake-quantized values are cast back to the input's dtype (`efficient_nlp.quant.quantizers`).

Every matmul also reports its shape and bit widths to an active `recording` (used by
`efficient_nlp.quant.cost` under ``jax.eval_shape``; nothing is recorded otherwise).
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.spec import QUANTIZERS, Quantizer, activation_quantizer, weight_granularity_check

_RECORDS: list | None = None


@contextlib.contextmanager
def recording():
    """Collects one dict per matmul run inside the block: site, kind, macs, w_bits, a_bits."""
    global _RECORDS
    previous, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = previous


def _record(site, kind, macs, w_bits, a_bits):
    if _RECORDS is not None:
        _RECORDS.append(dict(site=site, kind=kind, macs=int(macs), w_bits=w_bits, a_bits=a_bits))


def _bits(mod):
    return 32 if mod is None else mod.quantizer.bits


class QuantizerModule(nnx.Module):
    """Applies one `Quantizer`; holds its learned state.

    ``axis`` is the axis reduced for per-channel scales (weights only); with a ``group``
    quantizer it must be 0 (the kernel's input rows, reduced in blocks of ``group_size``: scales
    and LSQ steps ``[d_in // g, 1, d_out]``, docs/quantization.md).  A quantizer with an
    activation granularity (``token`` / ``example``) reduces `quantizers.activation_axis` of its
    input instead (a range per token / per batch row).  ``range_mode`` overrides the dynamic
    range's estimator (default ``absmax`` signed, ``minmax`` unsigned; ``nonneg``: the unsigned
    grid ``[0, max]`` of the attention probabilities).  Learned activation
    quantizers (``lsq``, ``pact``) start uncalibrated and must see data first (`calibrate`:
    LSQ step ``2 mean|x| / sqrt(Qp)``, LSQ+ offset = min; PACT clip = observed min / max).
    Weight quantizers are initialised from the weight they quantize (``init``; per group for
    group-wise LSQ).
    """

    def __init__(self, quantizer: Quantizer, *, axis=None, init: jax.Array | None = None,
                 range_mode: str | None = None):
        if quantizer.granularity == "group" and (axis != 0 or init is None):
            raise ValueError(f"{quantizer.name}: group-wise scales quantize a [d_in, d_out] kernel in blocks of "
                             f"its input rows: give axis=0 and init=<the kernel> (got axis={axis!r}, "
                             f"init {'missing' if init is None else 'given'})")
        if quantizer.granularity in Q.ACTIVATION_GRANULARITIES and axis is not None:
            raise ValueError(f"{quantizer.name}: an activation granularity ({quantizer.granularity!r}) reduces the "
                             f"token / example axes of each input; give axis=None (got {axis!r})")
        self.quantizer = quantizer
        self.axis = axis
        self.range_mode = range_mode or ("absmax" if quantizer.signed else "minmax")
        self.calibrating = False
        # True: the input is already on the grid (weights restored from a packed export,
        # `efficient_nlp.quant.restore`) and passes through unchanged.
        self.frozen = False
        # False: reconstruction (REM / MREM) keeps the learned step / clip values as they are
        # (set by the one-shot methods, `efficient_nlp.oneshot`, on the scales they chose).
        self.learn_scale = True
        self.calibrated = init is not None or quantizer.method not in ("lsq", "pact")
        m, b, signed = quantizer.method, quantizer.bits, quantizer.signed
        x = jnp.zeros((1,)) if init is None else jnp.asarray(init, jnp.float32)
        if m == "lsq":
            if quantizer.granularity == "group":  # the per-channel rule on each block of g rows
                x, axis = Q.group_view(x, quantizer.group_size), 1
            self.step = nnx.Param(Q.lsq_init(x, b, signed, axis=axis))
            if not signed:
                self.offset = nnx.Param(jnp.min(x, axis=axis, keepdims=axis is not None))
        elif m == "pact":
            self.lo = nnx.Param(jnp.min(x))
            self.hi = nnx.Param(jnp.max(x))

    def reduced_axes(self, x):
        """The axes of ``x`` that one range covers: per token / example for activations, else ``axis``."""
        if self.quantizer.granularity in Q.ACTIVATION_GRANULARITIES:
            return Q.activation_axis(self.quantizer.granularity, jnp.ndim(x))
        return self.axis

    def uniform_params(self, x):
        """``(scale, zero_point)`` in float32 of the ``uniform`` grid this module puts on ``x``."""
        return Q.uniform_params(x, self.quantizer.bits, self.quantizer.signed, self.reduced_axes(x),
                                self.range_mode, group_size=self.quantizer.group_size)

    def observe(self, x):
        """Sets the learned state from a sample ``x`` (eager; called by `calibrate`)."""
        m, b, signed = self.quantizer.method, self.quantizer.bits, self.quantizer.signed
        x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
        if m == "lsq":
            offset = jnp.min(x) if not signed else 0.0
            self.step[...] = Q.lsq_init(x - offset, b, signed).astype(self.step[...].dtype)
            if not signed:
                self.offset[...] = offset
        elif m == "pact":
            self.lo[...] = jnp.min(x)
            self.hi[...] = jnp.max(x)
        self.calibrated = True

    def __call__(self, x):
        if self.frozen:
            return x
        if self.calibrating:
            self.observe(x)
        if not self.calibrated:
            raise RuntimeError(
                f"a learned activation quantizer ({self.quantizer.name}) was used before calibration; "
                "call efficient_nlp.quant.calibrate(model, batch) once on real data first")
        m, b, signed = self.quantizer.method, self.quantizer.bits, self.quantizer.signed
        axis = self.reduced_axes(x)
        if m == "uniform":
            return Q.uniform(x, b, signed=signed, axis=axis, range_mode=self.range_mode,
                             group_size=self.quantizer.group_size)
        if m == "twn":
            return Q.twn(x, axis=axis)[0]
        if m == "bwn":
            return Q.bwn(x, axis=axis)[0]
        if m == "lsq":
            step = self.step[...]
            if signed:
                return Q.lsq(x, step, b, signed=True)
            return Q.lsq_plus(x, step, self.offset[...], b)
        if m == "pact":
            return Q.clip_quant(x, self.lo[...], self.hi[...], b, signed=signed)
        # A registered quantizer (Quantizer validated the name), in float32 like the built-in ones.
        dtype = jnp.asarray(x).dtype
        return jnp.asarray(QUANTIZERS[m](jnp.asarray(x, jnp.float32), b, signed, axis), dtype)


def _maybe(mod, x):
    return x if mod is None else mod(x)


def _no_groups(q: Quantizer | None, site: str, what: str):
    """Group-wise scales are for Linear kernels only (ValueError naming the site otherwise)."""
    if q is not None and q.granularity == "group":
        raise ValueError(f"{site}: {what} got the group-wise quantizer {q.name}; group-wise scales are for "
                         f"Linear kernels only (embeddings: 'channel' = row-wise, activations: 'token' or "
                         f"'example')")
    weight_granularity_check(q, f"{site}: {what}")


class QuantLinear(nnx.Module):
    """``y = Q_a(x) @ Q_w(kernel) + bias`` over an existing ``nnx.Linear``'s parameters.  A
    ``group`` weight quantizer needs a ``group_size`` dividing ``in_features``."""

    def __init__(self, linear: nnx.Linear, site: str, weight: Quantizer | None, inputs: Quantizer | None):
        self.kernel = linear.kernel
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.dtype
        self.site = site
        inputs = activation_quantizer(inputs, f"{site}: the input")
        weight_granularity_check(weight, f"{site}: the weight")
        if weight is not None and weight.granularity == "group":
            Q.check_group_size(self.in_features, weight.group_size, where=f"{site} ({weight.name})")
        axis = 0 if weight is not None and weight.granularity in ("channel", "group") else None
        self.weight_quant = None if weight is None else QuantizerModule(weight, axis=axis, init=self.kernel[...])
        self.input_quant = None if inputs is None else QuantizerModule(inputs)

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        x = _maybe(self.input_quant, jnp.asarray(x, dtype))
        w = _maybe(self.weight_quant, self.kernel[...]).astype(dtype)
        _record(self.site, "linear", math.prod(x.shape[:-1]) * w.shape[0] * w.shape[1],
                _bits(self.weight_quant), _bits(self.input_quant))
        y = jnp.dot(x, w)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class TiedTable:
    """``attend(x) = x @ table()^T`` for the quantized embedding modules: a tied LM head reads
    the same quantized table as the lookup (activations stay in float)."""

    def attend(self, x):
        return jnp.matmul(x, self.table().T.astype(x.dtype))


class QuantEmbed(TiedTable, nnx.Module):
    """Embedding lookup in a quantized table (row-wise scales with ``channel`` granularity)."""

    def __init__(self, embed: nnx.Embed, site: str, weight: Quantizer):
        self.embedding = embed.embedding
        self.num_embeddings, self.features = embed.num_embeddings, embed.features
        self.dtype = embed.dtype
        self.site = site
        _no_groups(weight, site, "the embedding table")
        axis = 1 if weight.granularity == "channel" else None
        self.weight_quant = QuantizerModule(weight, axis=axis, init=self.embedding[...])

    def table(self):
        """The fake-quantized table [V, E]."""
        table = self.weight_quant(self.embedding[...])
        return table if self.dtype is None else table.astype(self.dtype)

    def __call__(self, ids):
        return jnp.take(self.table(), jnp.asarray(ids), axis=0)


class AttentionQuant(nnx.Module):
    """The attention's ``q.k^T`` and ``probs.v`` with quantized inputs (the ``matmul_quant`` hook).

    Per-token ranges: ``q`` and ``k`` get one per (example, head, position), the rows and columns
    of ``q.k^T``, so their scales factor out of the product over the head dimension.  The
    probabilities' unsigned range is ``[0, max]`` per query (``range_mode="nonneg"``): masked and
    padded keys have probability exactly 0 and do not move the range.  Exact zeros stay exactly
    0 with every quantizer (`quantized_probs`; a learned LSQ+ offset or PACT ``lo`` would
    otherwise give masked keys, padding or future tokens, a weight).  The
    per-token scales ``s_v`` of ``v`` lie on the summed key axis of ``probs.v``, where they do not
    factor out of an integer product; they are folded into the probabilities instead (`fold_v`):

        context = Q_p(probs * s_v^T) @ d,    v ~ s_v * d  (d: v's integer codes)

    which is causal (key ``s`` only scales its own column) and runs as one int8 x int8 product in
    the integer model with the same codes.  ``v`` with a per-example or learned (static) scale is
    ``Q_p(probs) @ Q_v(v)`` (its scale factors out).
    """

    def __init__(self, site: str, q: Quantizer | None, k: Quantizer | None, v: Quantizer | None,
                 probs: Quantizer | None):
        self.site = site
        parts = ("q", "k", "v", "probs")
        qs = [activation_quantizer(x, f"{site}.{part}") for part, x in zip(parts, (q, k, v, probs))]
        self.q, self.k, self.v = (None if x is None else QuantizerModule(x) for x in qs[:3])
        p = qs[3]
        self.probs = None if p is None else QuantizerModule(p, range_mode=None if p.signed else "nonneg")

    def fold_v(self) -> bool:
        """Whether ``v``'s per-token scales are folded into the probabilities (class docstring):
        ``v`` and ``probs`` quantized, ``v`` with a dynamic signed (``uniform``) range per token."""
        v = self.v
        return (self.probs is not None and v is not None and v.quantizer.method == "uniform"
                and v.quantizer.signed and v.quantizer.granularity == "token")

    def quantized_probs(self, p):
        """``Q_p(p)`` where ``p != 0``, exactly 0 where ``p == 0`` (masked keys)."""
        return jnp.where(p == 0, jnp.zeros_like(p), self.probs(p))

    def scores(self, q, k):
        """q, k [B,N,T,D] -> Q(q) @ Q(k)^T [B,N,T,S]."""
        b, n, t, d = q.shape
        _record(self.site + ".scores", "attention", b * n * t * k.shape[2] * d, _bits(self.k), _bits(self.q))
        return jnp.matmul(_maybe(self.q, q), _maybe(self.k, k).transpose(0, 1, 3, 2))

    def context(self, probs, v):
        """probs [B,N,T,S], v [B,N,S,D] -> Q(probs) @ Q(v) [B,N,T,D] (with `fold_v`:
        ``Q(probs * s_v^T) @ codes(v)``)."""
        b, n, t, s = probs.shape
        _record(self.site + ".context", "attention", b * n * t * s * v.shape[-1], _bits(self.v), _bits(self.probs))
        if not self.fold_v():
            p = probs if self.probs is None else self.quantized_probs(probs)
            return jnp.matmul(p, _maybe(self.v, v))
        dtype = jnp.result_type(probs, v)
        v32 = jnp.asarray(v, jnp.float32)
        s_v, zp = self.v.uniform_params(v32)                         # [B,N,S,1], zero point 0
        codes = Q.quantize_codes(v32, s_v, zp, self.v.quantizer.bits).astype(jnp.float32)
        ratio = v32 / s_v
        d = ratio + jax.lax.stop_gradient(codes - ratio)              # the codes; gradient 1 / s_v
        weighted = self.quantized_probs(jnp.asarray(probs, jnp.float32) * jnp.swapaxes(s_v, -1, -2))
        return jnp.matmul(weighted.astype(dtype), d.astype(dtype))
