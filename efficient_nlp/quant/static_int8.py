"""Static-scale int8 inference: W8A8 with calibrated activation scales, for CPU deployment.

    static = quant.to_static_int8(model, calibration_batch)     # a float model: PACT W8A8, calibrated
    logits = static.forward(ids, mask, types)                    # jitted, int8 products
    logits = static.model(ids, mask, types).logits               # the same model, un-jitted

`efficient_nlp.quant.to_integer_model` computes a range per token for every activation, i.e. a
reduction and a separate quantization pass before each int8 product.  With *static* scales
(the learned ``lsq`` step or ``pact`` clip values, set by `efficient_nlp.quant.calibrate` and
possibly trained by QAT) the quantization of an activation is elementwise,

    c = clip(round(clip(x, lo, hi) / s), Qn, Qp)           (PACT; LSQ: clip(round(x / s), Qn, Qp))

so XLA fuses it into the op that produces ``x`` (LayerNorm, GELU, bias add) and the rescaling of
the accumulator, ``y = (acc + shift * colsum) * (s_x * s_w) + (offset * colsum * s_w + bias)``
(the zero-point algebra of `efficient_nlp.quant.integer.IntLinear`, with per-column constants),
into the op that reads ``y`` (residual add + LayerNorm, GELU).  Weights and the word embedding
are converted to codes once; the query / key / value projections of a BERT-family attention
with one input quantizer become one ``[H, 3W]`` product.

The integer product ``c @ d`` runs on one of two carriers (``carrier=``):

* ``"bf16"`` (default): the codes as bfloat16 operands with float32 accumulation.  Every code
  ``|c| <= 128``, ``|d| <= 127`` is exact in bfloat16, every product ``c_k d_k`` is exact in
  float32 and so is every partial sum while ``sum_k |c_k d_k| <= 128 * 127 * K < 2^24``, i.e.
  ``K <= MAX_EXACT_K = 1032`` -- whatever order the matmul sums in, the result equals the
  int32 product bit for bit.  Longer contractions (the FFN output, ``K = 1536``) run as one
  batched product over equal exact slices (2 x 768) summed in int32 (`carried_matmul`).  On
  x86 CPUs XLA runs these products with its YNNPACK/XNNPACK library (AVX-512 BF16); GPUs and
  TPUs run bfloat16 products with float32 accumulation as well;
* ``"int8"``: XLA's int8 x int8 -> int32 ``dot_general``.

Accuracy options of a float model calibrated here: activation grids are asymmetric
(``asymmetric=True``, default: the ``[lo, hi]`` grid of a LayerNorm output with one-sided
outlier channels wastes no levels; its zero point is one constant per output column);
``clip=`` sets each range to the min / max of the calibration inputs (``"minmax"``, default), a
central ``percentile`` of them, or the range minimising their quantization mean squared error
(``"mse"``, `mse_range`); ``smooth="smoothquant"`` first migrates input-channel outliers into the
weights where the inverse scale folds exactly into the float model (`efficient_nlp.oneshot.smooth`:
on post-LayerNorm BERT-family layers only the attention output's input, through the value
projection; a LayerNorm output also feeds the residual); ``float_inputs`` keeps the inputs of
some Linear roles in float (those products run as float matmuls: slower).  On MiniLM sentence
embeddings clipping hurts (its outlier channels carry signal) and the FFN inputs (``ffn_in``,
``ffn_out``) are the sensitive sites; the repository's ``benchmarks/int8_accuracy.py`` prints the
comparison.

Attention's ``q.k^T`` and ``probs.v`` stay as the fake-quant model computes them (float
matmuls; with an attention quantizer its static fake quantization, also elementwise).  The
result equals the fake-quantized model with the same static scales up to float rounding of the
rescaling (and hence, rarely, a code on a rounding tie of the next quantizer).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.models.bert import BertAttention
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.export import weight_codes
from efficient_nlp.quant.integer import IntCodes, IntEmbed, _scale_vector, activation_codes
from efficient_nlp.quant.spec import QuantSpec, make_spec
from efficient_nlp.quant.transform import ACTIVATION_QUANTIZERS, calibrate, find_sites, quantize_model, \
    quantizer_modules

#: Activation quantizer methods with static scales (learned / calibrated, not computed per call).
STATIC_METHODS = ("lsq", "pact")
#: Longest contraction whose bfloat16-carried int8 product is exact: ``128 * 127 * K < 2^24``.
MAX_EXACT_K = (2 ** 24 - 1) // (128 * 127)
CARRIERS = {"bf16": jnp.bfloat16, "int8": jnp.int8}
#: How `to_static_int8` sets the PACT clip range of each activation quantizer from its calibration inputs.
CLIPS = ("minmax", "percentile", "mse")
#: Calibration inputs (values) one quantizer's ``mse`` search looks at, an even subsample of the rest.
MSE_SAMPLE = 1 << 18


def carried_matmul(codes, w_codes):
    """``codes [..., K] @ w_codes [K, N]`` of integer codes -> float32 holding the exact int32
    product.  int8 operands: XLA's int8 dot with int32 accumulation.  bfloat16 operands (integer
    codes carried exactly): float32 accumulation, exact for ``K <= MAX_EXACT_K`` (module
    docstring); a longer ``K`` runs as one batched product over ``P = ceil(K / MAX_EXACT_K)``
    equal slices (``[P, ..., K/P] @ [P, K/P, N]``, zero codes padding ``K`` to a multiple of
    ``P``) whose exact results are summed in int32."""
    k, lead = codes.shape[-1], codes.ndim - 1
    if codes.dtype == jnp.int8:
        return jax.lax.dot_general(codes, w_codes, (((lead,), (0,)), ((), ())),
                                   preferred_element_type=jnp.int32).astype(jnp.float32)
    pieces = math.ceil(k / MAX_EXACT_K)
    if pieces == 1:
        return jax.lax.dot_general(codes, w_codes, (((lead,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    size = math.ceil(k / pieces)
    if size * pieces != k:  # zero codes add nothing to the product
        codes = jnp.pad(codes, [(0, 0)] * lead + [(0, size * pieces - k)])
        w_codes = jnp.pad(w_codes, [(0, size * pieces - k), (0, 0)])
    sliced = codes.reshape(codes.shape[:-1] + (pieces, size))                    # [..., P, K/P]
    acc = jax.lax.dot_general(sliced, w_codes.reshape(pieces, size, -1),         # [P, ..., N]
                              (((lead + 1,), (1,)), ((lead,), (0,))), preferred_element_type=jnp.float32)
    return jnp.sum(acc.astype(jnp.int32), axis=0).astype(jnp.float32)


def _grid_params(qm: M.QuantizerModule) -> list:
    return [jnp.asarray(getattr(qm, n)[...]) for n in ("step", "offset", "lo", "hi") if hasattr(qm, n)]


def same_grid(a: M.QuantizerModule, b: M.QuantizerModule) -> bool:
    """Whether two static activation quantizers put the same grid on any input (one set of codes)."""
    pa, pb = _grid_params(a), _grid_params(b)
    return (a.quantizer == b.quantizer and a.range_mode == b.range_mode and len(pa) == len(pb)
            and all(x.shape == y.shape and bool(jnp.all(x == y)) for x, y in zip(pa, pb)))


def _int_weight(qlinear: M.QuantLinear) -> bool:
    """A QuantLinear with a signed (or ternary / binary) non-group weight grid and a quantized input."""
    wq, aq = qlinear.weight_quant, qlinear.input_quant
    return (wq is not None and aq is not None and aq.quantizer.bits <= 8 and wq.quantizer.granularity != "group"
            and (wq.quantizer.signed or wq.quantizer.method in ("twn", "bwn")))


class StaticLinear(nnx.Module):
    """One or more `QuantLinear` sharing an input quantizer, as one product with their kernels
    side by side: ``y = (acc + shift * colsum) * (s_x * s_w) + (offset * colsum * s_w + bias)``
    with ``acc = c @ d`` (`carried_matmul`) and the static codes ``c`` of the input."""

    def __init__(self, qlinears: Sequence[M.QuantLinear], carrier: str = "bf16"):
        first = qlinears[0]
        codes = [weight_codes(q.weight_quant, q.kernel[...]) for q in qlinears]
        d = jnp.concatenate([c["codes"] for c in codes], axis=1)
        self.w_codes = IntCodes(d.astype(CARRIERS[carrier]))
        self.w_scale = IntCodes(jnp.concatenate([jnp.broadcast_to(_scale_vector(c["scale"]), (q.out_features,))
                                                 for c, q in zip(codes, qlinears)]))
        self.w_colsum = IntCodes(jnp.sum(d.astype(jnp.int32), axis=0).astype(jnp.float32))  # exact: < 2^24
        self.bias = IntCodes(jnp.concatenate([jnp.zeros((q.out_features,), jnp.float32) if q.bias is None
                                              else jnp.asarray(q.bias[...], jnp.float32) for q in qlinears]))
        self.input_quant = first.input_quant
        self.sites = tuple(q.site for q in qlinears)
        self.out_features = tuple(q.out_features for q in qlinears)

    def __call__(self, x):
        c, s_x, offset, shift = activation_codes(self.input_quant, x)
        acc = carried_matmul(c.astype(self.w_codes[...].dtype), self.w_codes[...])
        colsum, s_w = self.w_colsum[...], self.w_scale[...]
        if shift:  # the unsigned levels c + shift, exactly (integers below 2^24 in float32)
            acc = acc + shift * colsum
        const = self.bias[...] if offset is None else self.bias[...] + offset * colsum * s_w
        return acc * (s_x * s_w) + const


class StaticAttention(nnx.Module):
    """A BERT-family `BertAttention` (post-LayerNorm, no dropout at inference) with one
    `StaticLinear` for query / key / value and one for the output dense; ``q.k^T`` and
    ``probs.v`` as in the fake-quant model (its ``matmul_quant`` hook, or float)."""

    def __init__(self, attention: BertAttention, carrier: str = "bf16"):
        self.qkv = StaticLinear([attention.query, attention.key, attention.value], carrier)
        self.output = StaticLinear([attention.output], carrier)
        self.layer_norm = attention.layer_norm
        self.head_dim = attention.head_dim
        self.matmul_quant = attention.matmul_quant

    def __call__(self, x, bias=None, *, want: frozenset = frozenset(), deterministic: bool = True, rngs=None):
        """x [B,T,H], bias [B,1,1,T] additive (or None) -> (out [B,T,H], captured dict)."""
        if not deterministic:
            raise ValueError("the static int8 model is for inference: call it with deterministic=True")
        b, t, _ = x.shape
        d = self.head_dim
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)

        def heads(y):  # [B,T,N*D] -> [B,N,T,D]
            return y.reshape(b, t, y.shape[-1] // d, d).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        mq = self.matmul_quant
        qk = jnp.matmul(q, k.transpose(0, 1, 3, 2)) if mq is None else mq.scores(q, k)
        scores = qk * (1.0 / math.sqrt(d))
        logits = scores if bias is None else scores + bias
        probs = jax.nn.softmax(logits, axis=-1)
        context = jnp.matmul(probs, v) if mq is None else mq.context(probs, v)
        context = context.transpose(0, 2, 1, 3).reshape(b, t, -1)
        out = self.layer_norm(self.output(context) + x)
        values = {"attn_input": x, "ffn_input": out, "attn_scores": scores, "attn_probs": probs, "values": v,
                  "context": context, "mha_out": out}
        return out, {name: values[name] for name in want if name in values}


class StaticInt8(NamedTuple):
    """`to_static_int8`'s result: the converted ``model`` (``model(ids, mask, types).logits``)
    and ``forward(*inputs) -> logits``, its jitted forward."""

    model: nnx.Module
    forward: Callable


def check_static(qmodel) -> None:
    """ValueError naming the activation quantizers whose range is computed per call (``uniform``
    or a registered method) or that were never calibrated, and the fix."""
    acts = [(p, m) for p, m in quantizer_modules(qmodel) if p.rsplit(".", 1)[-1] in ACTIVATION_QUANTIZERS]
    dynamic = [f"{p} ({m.quantizer.name})" for p, m in acts if m.quantizer.method not in STATIC_METHODS]
    if dynamic:
        raise ValueError(f"to_static_int8 needs static activation scales, but {len(dynamic)} activation quantizer(s) "
                         f"compute a range per call: {dynamic[:3]}; quantize with make_spec(..., "
                         f"activation_method='pact') (or 'lsq') and calibrate, or pass the float model with a "
                         f"calibration batch, or use quant.to_integer_model for dynamic ranges")
    missing = [p for p, m in acts if not m.calibrated]
    if missing:
        raise ValueError(f"to_static_int8: {len(missing)} activation quantizer(s) are not calibrated ({missing[:3]}); "
                         f"pass a calibration batch (or run quant.calibrate(qmodel, batch) first)")


class _Recorder(nnx.Module):
    """Stands in for an activation quantizer during `calibration_inputs`: hands its input to
    ``sink`` and passes it on unquantized (``quantizer``: the replaced one's, for its readers)."""

    def __init__(self, path: str, sink: Callable, quantizer):
        self.path, self.sink, self.quantizer = path, sink, quantizer

    def __call__(self, x):
        self.sink(self.path, x)
        return x


def calibration_inputs(qmodel, calibration: dict | Callable) -> dict[str, np.ndarray]:
    """``{path: values}``: the float32 inputs of every ``pact`` activation quantizer of ``qmodel``
    on one float forward pass over ``calibration`` (a batch dict or ``fn(model)``; activations
    unquantized, weights as ``qmodel`` has them), flattened; with a batch dict only the real
    tokens (``attention_mask``) of ``[B, T, ...]`` inputs, since padding never reaches a result."""
    paths = [p for p, m in quantizer_modules(qmodel) if p.rsplit(".", 1)[-1] in ACTIVATION_QUANTIZERS
             and m.quantizer.method == "pact"]
    mask = None if callable(calibration) or calibration.get("attention_mask") is None else \
        np.asarray(calibration["attention_mask"]).astype(bool)
    seen: dict[str, list] = {p: [] for p in paths}

    def sink(path, x):
        x = np.asarray(x, np.float32)
        seen[path].append(x[mask] if mask is not None and x.shape[:2] == mask.shape else x)

    model = train.copy_model(qmodel)
    for p in paths:
        F.set_module(model, p, _Recorder(p, sink, F.get_module(model, p).quantizer))
    calibration(model) if callable(calibration) else F.forward(model, calibration)
    return {p: np.concatenate([v.reshape(-1) for v in seen[p]]) for p in paths if seen[p]}


def quant_mse(x, lo, hi, bits: int, signed: bool) -> jax.Array:
    """Mean squared error of PACT's fake quantization (`quantizers.clip_quant`) of ``x`` with
    the clip range ``[lo, hi]``: rounding inside the range plus clipping outside it."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.mean(jnp.square(Q.clip_quant(x, lo, hi, bits, signed=signed) - x))


@functools.partial(jax.jit, static_argnames=("bits", "signed"))
def _best(x, los, his, bits, signed):
    errs = jax.vmap(lambda lo, hi: quant_mse(x, lo, hi, bits, signed))(los, his)
    i = jnp.argmin(errs)
    return los[i], his[i]


def mse_range(x, bits: int, signed: bool, steps: int = 100) -> tuple[float, float]:
    """The clip range ``[lo, hi]`` inside ``[min x, max x]`` minimising `quant_mse` of ``x``
    (MSE-optimal clipping, e.g. Banner et al. 2019; Sung et al. 2015), searched on a grid of
    ``steps`` candidates per bound that includes the full range, so its error never exceeds the
    min / max range's.  Signed (symmetric) grids: one threshold ``t`` (``lo = max(min, -t)``,
    ``hi = min(max, t)``); unsigned grids: ``hi`` then ``lo``, alternately, twice.  At most
    `MSE_SAMPLE` values (an even subsample) enter the search."""
    x = np.asarray(x, np.float32).reshape(-1)
    if x.size > MSE_SAMPLE:
        x = x[:: -(-x.size // MSE_SAMPLE)]
    lo, hi = float(x.min()), float(x.max())
    frac = np.linspace(1.0 / steps, 1.0, steps, dtype=np.float32)
    xs = jnp.asarray(x)
    if signed:
        t = max(-lo, hi) * frac
        best = _best(xs, np.maximum(np.float32(lo), -t), np.minimum(np.float32(hi), t), bits, True)
        return float(best[0]), float(best[1])
    cur_lo, cur_hi = lo, hi
    for _ in range(2):
        his = np.minimum(cur_lo + (hi - cur_lo) * frac, np.float32(hi))  # the last one is hi, exactly
        cur_hi = float(_best(xs, np.full(steps, cur_lo, np.float32), his, bits, False)[1])
        los = np.maximum(cur_hi - (cur_hi - lo) * frac, np.float32(lo))
        cur_lo = float(_best(xs, los, np.full(steps, cur_hi, np.float32), bits, False)[0])
    return cur_lo, cur_hi


def clip_range(x, quantizer, clip: str, percentile: float = 99.99) -> tuple[float, float]:
    """The PACT clip range ``(lo, hi)`` of a quantizer from its calibration inputs ``x``:
    ``"minmax"`` the extremes, ``"percentile"`` the central ``percentile`` percent of the values
    (``lo``, ``hi`` = the ``(100 - p)``-th and ``p``-th percentiles), ``"mse"`` `mse_range`."""
    x = np.asarray(x, np.float32).reshape(-1)
    if clip == "minmax":
        return float(x.min()), float(x.max())
    if clip == "percentile":
        lo, hi = np.percentile(x, [100.0 - percentile, percentile])
        return float(lo), float(hi)
    if clip == "mse":
        return mse_range(x, quantizer.bits, quantizer.signed)
    raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")


def calibrate_clipped(qmodel, calibration: dict | Callable, clip: str = "minmax", percentile: float = 99.99) -> None:
    """`efficient_nlp.quant.calibrate` of ``qmodel`` (in place), then, for ``clip`` other than
    ``"minmax"``, each ``pact`` activation quantizer's ``lo`` / ``hi`` set by `clip_range` from
    its `calibration_inputs`."""
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {CLIPS}, got {clip!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100] (the central share of values kept), got {percentile}")
    calibrate(qmodel, calibration)
    if clip == "minmax":
        return
    for path, x in calibration_inputs(qmodel, calibration).items():
        qm = F.get_module(qmodel, path)
        lo, hi = clip_range(x, qm.quantizer, clip, percentile)
        qm.lo[...] = jnp.asarray(lo, qm.lo[...].dtype)
        qm.hi[...] = jnp.asarray(hi, qm.hi[...].dtype)


def default_spec(model, float_inputs: Sequence[str] = (), asymmetric: bool = True) -> QuantSpec:
    """W8A8 with PACT (calibrated, static) activation ranges on every Linear input, int8
    row-wise word embeddings, attention's ``q.k^T`` and ``probs.v`` in float; the inputs of the
    Linears of the layer roles in ``float_inputs`` (e.g. ``("ffn_out",)``) stay float too.
    ``asymmetric`` (default): every Linear input gets the unsigned ``[lo, hi]`` grid (the range of
    a LayerNorm output with one-sided outlier channels is not wasted on values that never occur;
    its zero point costs one constant per output column in `StaticLinear`, no extra product);
    else symmetric grids except after GELU / ReLU (`make_spec`)."""
    _, sites = find_sites(model)
    attention = [s for s in sites if s.rsplit(".", 1)[-1] in ("q", "k", "v", "probs")]
    rules = [(r"\.(q|k|v|probs)$", None)] if attention else []
    if float_inputs:
        bad = sorted(set(float_inputs) - set(F.LAYER_ROLES))
        if bad:
            raise ValueError(f"float_inputs: unknown layer role(s) {bad}; valid: {list(F.LAYER_ROLES)}")
        paths = [s.path for s in F.sites(model, tuple(float_inputs))]
        if not paths:
            raise ValueError(f"float_inputs: the model has no Linear of the roles {list(float_inputs)}")
        rules.append((r"^(" + "|".join(map(re.escape, paths)) + r")\.input$", None))
    if asymmetric:
        rules.append((r"\.input$", {"signed": False}))
    return make_spec(8, 8, 8, activation_method="pact", rules=rules)


def _is_quantized(model) -> bool:
    return any(isinstance(m, (M.QuantLinear, M.QuantEmbed)) for _, m in nnx.iter_modules(model))


def convert(qmodel, carrier: str = "bf16"):
    """A copy of the fake-quantized ``qmodel`` (static activation scales, `check_static`) with
    int8 codes: fused `StaticAttention` where a BERT-family attention's four Linears are int8
    sites with one input grid, `StaticLinear` for the other int8 Linears, `IntEmbed` for
    quantized embeddings.  Other sites stay as they are (fake-quantized or float)."""
    if carrier not in CARRIERS:
        raise ValueError(f"carrier must be one of {sorted(CARRIERS)}, got {carrier!r}")
    check_static(qmodel)
    model = train.copy_model(qmodel)
    for path, mod in list(nnx.iter_modules(model)):
        if isinstance(mod, BertAttention) and not isinstance(mod.query, StaticLinear):
            parts = (mod.query, mod.key, mod.value, mod.output)
            if all(isinstance(q, M.QuantLinear) and _int_weight(q) for q in parts) and \
                    same_grid(mod.query.input_quant, mod.key.input_quant) and \
                    same_grid(mod.query.input_quant, mod.value.input_quant):
                F.set_module(model, ".".join(map(str, path)), StaticAttention(mod, carrier))
    for path, mod in list(nnx.iter_modules(model)):
        if isinstance(mod, M.QuantLinear) and _int_weight(mod):
            F.set_module(model, ".".join(map(str, path)), StaticLinear([mod], carrier))
        elif isinstance(mod, M.QuantEmbed):
            F.set_module(model, ".".join(map(str, path)), IntEmbed(mod))
    return model


def jit_forward(model) -> Callable:
    """``forward(*inputs) -> model(*inputs).logits`` compiled once per input shape; the model's
    state is captured (later changes to ``model`` are not seen)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *inputs):
        return nnx.merge(graphdef, state)(*inputs).logits

    return functools.partial(run, state)


def to_static_int8(model, calibration: dict | Callable | None = None, *, spec: QuantSpec | None = None,
                   carrier: str = "bf16", clip: str = "minmax", percentile: float = 99.99, smooth: str | None = None,
                   alpha: float = 0.5, float_inputs: Sequence[str] = (), asymmetric: bool | None = None) -> StaticInt8:
    """Static-scale int8 inference model (module docstring) and its jitted forward.

    ``model``: a float model (quantized with ``spec``, default `default_spec`: W8A8 with PACT
    activation ranges, attention matmuls in float, then calibrated on ``calibration``, a batch
    dict or ``fn(model)`` as for `efficient_nlp.quant.calibrate`), or a fake-quantized model
    whose activation quantizers are ``lsq`` / ``pact`` (after QAT; calibrated here on
    ``calibration`` only when they are not calibrated yet, so learned steps are kept).
    ``carrier``: ``"bf16"`` or ``"int8"`` operands of the integer products (same results).
    Calibration here: ``clip`` (`CLIPS`, `clip_range`: ``"mse"``, ``"percentile"`` of
    ``percentile``, ``"minmax"``) sets the PACT ranges.  Float model only: ``smooth="smoothquant"``
    runs `efficient_nlp.oneshot.smooth` (``alpha``) on ``calibration`` (a batch dict) first;
    ``float_inputs``: layer roles whose Linear inputs stay float, ``asymmetric``: unsigned
    activation grids (`default_spec`; default True without ``spec``; a quantized model keeps its
    own grids).
    ``model`` is not changed.
    """
    if smooth not in (None, "smoothquant"):
        raise ValueError(f"smooth must be None or 'smoothquant', got {smooth!r}")
    if _is_quantized(model):
        if spec is not None or smooth is not None or float_inputs:
            raise ValueError("to_static_int8: the model is already quantized; spec=, smooth= and float_inputs= "
                             "apply to the float model only (pass the float model with a calibration batch)")
        qmodel = model
        if calibration is not None and not all(m.calibrated for _, m in quantizer_modules(model)):
            qmodel = train.copy_model(model)
            calibrate_clipped(qmodel, calibration, clip, percentile)
    else:
        if calibration is None:
            raise ValueError("to_static_int8 on a float model needs a calibration batch (a dict with input_ids, "
                             "attention_mask, token_type_ids of representative rows) to set the activation scales")
        if spec is not None and (float_inputs or asymmetric is not None):
            raise ValueError("to_static_int8: give either spec= or float_inputs= / asymmetric= (rules of your spec "
                             "can leave inputs in float: (r'<site>\\.input$', None), or make them unsigned: "
                             "(r'\\.input$', {'signed': False}))")
        if smooth is not None:
            if callable(calibration):
                raise ValueError("to_static_int8: smooth= needs the calibration batch as a dict of token arrays "
                                 "(input_ids, attention_mask, token_type_ids), not a function")
            from efficient_nlp import oneshot

            model = oneshot.smooth(model, calibration, method=smooth, alpha=alpha, log=None).model
        qmodel, _ = quantize_model(model, spec or default_spec(model, float_inputs, asymmetric is not False))
        calibrate_clipped(qmodel, calibration, clip, percentile)
    smodel = convert(qmodel, carrier)
    return StaticInt8(smodel, jit_forward(smodel))


__all__ = ["CARRIERS", "CLIPS", "MAX_EXACT_K", "MSE_SAMPLE", "STATIC_METHODS", "StaticAttention", "StaticInt8",
           "StaticLinear", "calibrate_clipped", "calibration_inputs", "carried_matmul", "check_static", "clip_range",
           "convert", "default_spec", "jit_forward", "mse_range", "quant_mse", "same_grid",
           "to_static_int8"]
