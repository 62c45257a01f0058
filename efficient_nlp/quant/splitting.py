"""Ternary weight splitting (TWS, BinaryBERT, Bai et al. 2021; docs/binarybert.md): a ternary model -> a binary model
that computes the same function.

    qmodel, _ = quant.quantize_model(half_width_model, quant.make_spec(2, 2, 8))   # TWN weights
    ... train qmodel ...
    binary, report = quant.split_model(qmodel)          # every TWN matrix -> two BWN matrices
    # binary(ids) == qmodel(ids) up to float rounding; fine-tune `binary` from here.

The operator (`ternary_weight_split`)
-------------------------------------
Given a latent weight ``w`` (one scale group: the whole matrix, or one embedding row), let
``TWN(w) = alpha * sign(w)`` on ``I = {|w| >= Delta}`` and 0 on the zero set ``J`` (TWN,
docs/quantization.md; ``n = |I| + |J|`` elements, ``S_I = sum_I |w| = |I| alpha``, ``S_J = sum_J |w|``).  We want
``w1 + w2 = w`` and ``BWN(w1) + BWN(w2) = TWN(w)`` with ``BWN(v) = mean|v| * sign(v)``.
BinaryBERT prescribes the form::

    on I:                  w1 = a w,        w2 = (1 - a) w          0 < a < 1
    on J with w > 0:       w1 = w + b,      w2 = -b                 b > 0
    on J with w <= 0:      w1 = b,          w2 = w - b

On ``I`` both halves have the sign of ``w`` (as ``0 < a < 1``), so ``BWN(w1) + BWN(w2) =
(alpha1 + alpha2) sign(w)`` there; on ``J`` the halves have opposite signs (``w + b > 0 > -b``,
``b > 0 > w - b``), so the sum is ``(alpha1 - alpha2) * (+-1)``.  The two conditions are therefore

    (i)  alpha1 = alpha2           (the zeros stay zero)
    (ii) alpha1 + alpha2 = alpha   (the non-zeros keep the ternary scale)

Write ``J = C1 u C2`` where ``C1`` are the zeros whose value ``w1`` carries (``|w1| = |w| + b``,
``|w2| = b``) and ``C2`` those ``w2`` carries; the form above is ``C1 = {w > 0}``, ``C2 =
{w <= 0}``.  With ``S_k = sum_{C_k} |w|``::

    n alpha1 = a S_I + S_1 + |J| b
    n alpha2 = (1 - a) S_I + S_2 + |J| b

    (i)  => a = 1/2 + (S_2 - S_1) / (2 S_I)
    (ii) => S_I + S_J + 2 |J| b = n alpha = (|I| + |J|) alpha  =>  b = (alpha - mean_J |w|) / 2

``b > 0`` always: every zero has ``|w| < Delta`` and every kept element ``|w| >= Delta``, so
``mean_J |w| < Delta <= alpha``.  ``0 < a < 1`` holds iff ``|S_1 - S_2| < S_I``, which the
sign-based form does NOT guarantee: with an all-positive (or all-negative) zero set ``S_2 = 0``
and ``S_1 = S_J`` can exceed ``S_I`` (many elements just below ``Delta``, one large element), and
then the closed form gives ``a < 0`` (the "sign error" cases).  Then this code assigns the zeros
to ``C1`` / ``C2`` alternately in decreasing order of ``|w|`` (``x_1 >= x_2 >= ...``), so
``0 <= S_1 - S_2 = (x_1 - x_2) + (x_3 - x_4) + ... <= x_1 < Delta <= alpha <= S_I`` and
``0 < a <= 1/2``.  Both assignments satisfy (i) and (ii) exactly; the published sign-based one is
used whenever it gives ``0 < a < 1`` (the usual case: a near-symmetric zero set gives ``a ~ 1/2``).

Degenerate groups: an empty zero set (``|w|`` all equal, or one element) gives ``a = 1/2`` and no
``b`` is needed (``b = 0`` is returned); an all-zero group has ``TWN = 0``, ``S_I = 0`` and
``alpha = 0``: the split is ``w1 = w2 = 0`` (``a = 1/2``, ``b = 0``), whose BWN is 0 too.  Exact
zeros ``w = 0`` are in ``J`` with ``w <= 0`` and split into ``(b, -b)`` (or ``(-b, b)``), both
non-zero, so ``sign(0) = +1`` of `binary_codes` never matters.  Float limits: a weight within a
factor ``1/a`` of the smallest normal float (``|w| < ~2.4e-38`` in float32) makes ``a w`` subnormal,
which XLA on CPU flushes to zero; such weights do not occur in trained models.  ``axis`` reduces like `twn`
(``None``: one scale per matrix, layer-wise; ``1`` on an ``[V, H]`` embedding: one per row,
row-wise) and every quantity above is computed per scale group.

The split model (`split_model`)
-------------------------------
Each selected TWN `QuantLinear` / `QuantEmbed` becomes a `SplitLinear` / `SplitEmbed` holding two
latent weights (``kernel1``, ``kernel2`` / ``embedding1``, ``embedding2``) with a BWN quantizer
each (same granularity, own scale).  The Linear's input quantizer (with its learned state) and
its bias are kept once: ``y = Q_a(x) @ (BWN(w1) + BWN(w2)) + bias``.  A TWN matrix that is not
selected becomes plain BWN of its latent weight (adaptive splitting's "unsplit" part: not
equivalent).  Everything else (LayerNorm, position / token-type embeddings, the classifier,
activation quantizers, non-TWN weights) is shared unchanged with the copy.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp import train
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.spec import Quantizer
from efficient_nlp.quant.transform import _dotted, _replace


# ----------------------------------------------------------------------------- the operator
def _group_sum(x, axis):
    return Q._reduce(jnp.sum, x, axis, "ternary_weight_split")


def _alternate_by_magnitude(mag, zero, axis):
    """A bool mask: the zeros ranked 0, 2, 4, ... by decreasing ``mag`` within each scale group."""
    axes = Q._axes(axis, mag.ndim, "ternary_weight_split")
    keep = tuple(i for i in range(mag.ndim) if i not in axes)
    perm = keep + axes
    key = jnp.where(zero, mag, -1.0).transpose(perm)
    lead = key.shape[:len(keep)]
    flat = key.reshape(lead + (-1,))
    order = jnp.argsort(-flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    even = (rank % 2 == 0).reshape(key.shape)
    return jnp.transpose(even, tuple(perm.index(i) for i in range(mag.ndim))) & zero


def _split(w, axis):
    """``(w1, w2, a, b)`` of the module docstring's derivation (scalars keepdims per group)."""
    w = jax.lax.stop_gradient(Q._float(w))
    codes, alpha = Q.ternary_codes(w, axis)
    kept, zero = codes != 0, codes == 0
    mag = jnp.abs(w)
    fz = jnp.zeros_like(w)
    s_i = _group_sum(jnp.where(kept, mag, fz), axis)
    n_j = _group_sum(zero.astype(w.dtype), axis)
    s_j = _group_sum(jnp.where(zero, mag, fz), axis)
    b = jnp.where(n_j > 0, 0.5 * (alpha - s_j / jnp.maximum(n_j, 1.0)), jnp.zeros_like(alpha))
    safe_s_i = jnp.where(s_i > 0, s_i, jnp.ones_like(s_i))

    def a_of(carry1):
        s1 = _group_sum(jnp.where(carry1, mag, fz), axis)
        return jnp.where(s_i > 0, 0.5 + (s_j - 2.0 * s1) / (2.0 * safe_s_i), jnp.full_like(s_i, 0.5))

    by_sign = zero & (w > 0)                       # BinaryBERT's form: w1 carries the positive zeros
    a_sign = a_of(by_sign)
    ok = (a_sign > 0) & (a_sign < 1)
    balanced = _alternate_by_magnitude(mag, zero, axis)
    carry1 = jnp.where(ok, by_sign, balanced)
    a = jnp.where(ok, a_sign, a_of(balanced))
    sigma_b = jnp.where(w > 0, b, -b)              # b with the sign of the zero (w <= 0 -> -b)
    w1 = jnp.where(kept, a * w, jnp.where(carry1, w + sigma_b, -sigma_b))
    w2 = jnp.where(kept, (1.0 - a) * w, jnp.where(carry1, -sigma_b, w + sigma_b))
    return w1, w2, a, b


def ternary_weight_split(w, axis=None):
    """The TWS operator (docs/binarybert.md): latent ``w`` of a TWN matrix -> binary latent weights
    ``(w1, w2)`` with ``w1 + w2 == w`` and ``bwn(w1) + bwn(w2) == twn(w)`` element by element (up
    to float rounding of the means).  ``axis`` reduces like `twn` (None: layer-wise; the reduced
    axis, e.g. 1 for a ``[V, H]`` embedding: row-wise).  Derivation of the split's scalars ``a``,
    ``b`` and the degenerate cases: the module docstring (and docs/binarybert.md).  Jit-able;
    no gradient (an initialisation, not a training-time operation)."""
    w1, w2, _, _ = _split(w, axis)
    return w1, w2


def tws_scalars(w, axis=None):
    """``(a, b)`` of the split of ``w`` (0-d for ``axis=None``, keepdims per scale group otherwise):
    ``0 < a < 1`` and ``b > 0`` (``b = 0`` where a group has no zeros)."""
    _, _, a, b = _split(w, axis)
    return a, b


# ----------------------------------------------------------------------------- split modules
def _bwn_like(wq: M.QuantizerModule, init) -> M.QuantizerModule:
    return M.QuantizerModule(Quantizer("bwn", 1, True, wq.quantizer.granularity), axis=wq.axis, init=init)


def _param_like(var, value):
    return nnx.Param(jnp.asarray(value, jnp.asarray(var[...]).dtype))


class SplitLinear(nnx.Module):
    """``y = Q_a(x) @ (BWN(kernel1) + BWN(kernel2)) + bias`` (one input quantizer, one bias): the
    split of a TWN `QuantLinear` (two binary latent kernels, each with its own BWN scale)."""

    def __init__(self, qlinear: M.QuantLinear):
        wq = qlinear.weight_quant
        w1, w2, a, b = _split(qlinear.kernel[...], wq.axis)
        self.scalars = (float(jnp.mean(a)), float(jnp.mean(b)))   # the split's a, b (mean over groups)
        self.kernel1 = _param_like(qlinear.kernel, w1)
        self.kernel2 = _param_like(qlinear.kernel, w2)
        self.bias = qlinear.bias
        self.in_features, self.out_features = qlinear.in_features, qlinear.out_features
        self.dtype = qlinear.dtype
        self.site = qlinear.site
        self.weight_quant1 = _bwn_like(wq, w1)
        self.weight_quant2 = _bwn_like(wq, w2)
        self.input_quant = qlinear.input_quant

    def halves(self):
        """``[(attribute of the latent kernel, its QuantizerModule, site of the half)]``."""
        return [("kernel1", self.weight_quant1, self.site + ".w1"),
                ("kernel2", self.weight_quant2, self.site + ".w2")]

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.kernel1[...])
        x = M._maybe(self.input_quant, jnp.asarray(x, dtype))
        w = self.weight_quant1(self.kernel1[...]) + self.weight_quant2(self.kernel2[...])
        macs = math.prod(x.shape[:-1]) * w.shape[0] * w.shape[1]
        for _, _, site in self.halves():
            M._record(site, "linear", macs, 1, M._bits(self.input_quant))
        y = jnp.dot(x, w.astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class SplitEmbed(M.TiedTable, nnx.Module):
    """Lookup in ``BWN(embedding1) + BWN(embedding2)``: the split of a TWN `QuantEmbed` (row-wise
    scales with ``channel`` granularity, as the ternary table had)."""

    def __init__(self, qembed: M.QuantEmbed):
        wq = qembed.weight_quant
        w1, w2, a, b = _split(qembed.embedding[...], wq.axis)
        self.scalars = (float(jnp.mean(a)), float(jnp.mean(b)))   # the split's a, b (mean over groups)
        self.embedding1 = _param_like(qembed.embedding, w1)
        self.embedding2 = _param_like(qembed.embedding, w2)
        self.num_embeddings, self.features = qembed.num_embeddings, qembed.features
        self.dtype = qembed.dtype
        self.site = qembed.site
        self.weight_quant1 = _bwn_like(wq, w1)
        self.weight_quant2 = _bwn_like(wq, w2)

    def halves(self):
        """``[(attribute of the latent table, its QuantizerModule, site of the half)]``."""
        return [("embedding1", self.weight_quant1, self.site + ".w1"),
                ("embedding2", self.weight_quant2, self.site + ".w2")]

    def table(self):
        """``BWN(embedding1) + BWN(embedding2)`` [V, E]."""
        table = self.weight_quant1(self.embedding1[...]) + self.weight_quant2(self.embedding2[...])
        return table if self.dtype is None else table.astype(self.dtype)

    def __call__(self, ids):
        return jnp.take(self.table(), jnp.asarray(ids), axis=0)



SPLIT_MODULES = (SplitLinear, SplitEmbed)


# ----------------------------------------------------------------------------- model level
def _twn_modules(qmodel):
    out = []
    for path, mod in nnx.iter_modules(qmodel):
        if isinstance(mod, (M.QuantLinear, M.QuantEmbed)) and mod.weight_quant is not None \
                and mod.weight_quant.quantizer.method == "twn":
            out.append((path, mod))
    return out


def splittable_sites(qmodel) -> list[str]:
    """The sites (dotted module paths, e.g. layer 0's ``q`` site, `efficient_nlp.models.family.site_path`)
    of every TWN-quantized Linear / Embed of ``qmodel``: what `split_model` accepts."""
    return [mod.site for _, mod in _twn_modules(qmodel)]


@dataclasses.dataclass
class SplitReport:
    """What `split_model` did: ``split`` (sites now two binary halves, equivalent), ``binarized``
    (TWN sites turned into plain BWN of their latent weight, not equivalent) and ``rows`` of
    ``(site, "split" | "bwn", shape, mean a, mean b)`` (a, b: `tws_scalars`; None for bwn)."""

    split: list
    binarized: list
    rows: list

    def __str__(self):
        width = max([len(r[0]) for r in self.rows] + [4])
        lines = [f"ternary weight splitting: {len(self.split)} split, {len(self.binarized)} binarized",
                 f"{'site':<{width}}  {'action':<6}  {'shape':<14}  {'a':>7}  {'b':>10}"]
        for site, action, shape, a, b in self.rows:
            ab = f"{a:>7.4f}  {b:>10.3e}" if a is not None else f"{'':>7}  {'':>10}"
            lines.append(f"{site:<{width}}  {action:<6}  {str(tuple(shape)):<14}  {ab}")
        return "\n".join(lines)


def split_model(qmodel, sites=None):
    """``(split copy, SplitReport)``: every TWN matrix of ``qmodel`` whose site is in ``sites``
    (None = all of `splittable_sites`) becomes a `SplitLinear` / `SplitEmbed` (same function, to
    float rounding); every other TWN matrix becomes plain BWN of its latent weight.  ``qmodel``
    is not changed.  Raises ValueError for a model without TWN weights or an unknown site."""
    valid = splittable_sites(qmodel)
    if not valid:
        raise ValueError("split_model: the model has no TWN-quantized weights; quantize the (half-width) "
                         "float model with quant.make_spec(2, 2, a_bits) first")
    chosen = set(valid) if sites is None else set(sites)
    unknown = sorted(chosen - set(valid))
    if isinstance(sites, str) or unknown:
        raise ValueError(f"split_model: sites must be a list of splittable site names; unknown "
                         f"{unknown if unknown else sites!r}; valid: {valid}")
    model = train.copy_model(qmodel)
    rows, split, binarized = [], [], []
    for path, mod in _twn_modules(model):
        wq = mod.weight_quant
        var = mod.kernel if isinstance(mod, M.QuantLinear) else mod.embedding
        if mod.site in chosen:
            new = SplitLinear(mod) if isinstance(mod, M.QuantLinear) else SplitEmbed(mod)
            _replace(model, path, new)
            split.append(mod.site)
            rows.append((mod.site, "split", var[...].shape, *new.scalars))
        else:
            mod.weight_quant = _bwn_like(wq, var[...])
            binarized.append(mod.site)
            rows.append((mod.site, "bwn", var[...].shape, None, None))
    return model, SplitReport(split, binarized, rows)


def split_modules(model) -> list[tuple[str, nnx.Module]]:
    """``[(module path, SplitLinear or SplitEmbed)]`` of a split model."""
    return [(_dotted(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, SPLIT_MODULES)]


__all__ = ["ternary_weight_split", "tws_scalars", "SplitLinear", "SplitEmbed", "SplitReport", "split_model",
           "splittable_sites", "split_modules", "SPLIT_MODULES"]
