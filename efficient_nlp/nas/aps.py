"""Affine parameter sharing (APS) layers: a meta weight of maximal width plus P / Q transforms.

Wang et al. 2020; docs/nas.md.  A layer holds a meta kernel ``W`` of the maximal widths (``[c_in, c_out]``
for a dense layer, ``[k, k, c_in, c_out]`` for a conv, channel axes last as in Flax) and, for
every searched channel axis, one transformation matrix per candidate width:
``Q^i in R^{c_in x c_i}`` (input axis), ``P^o in R^{c_out x c_o}`` (output axis), unit-norm
columns.  The candidate kernel for input width ``i`` and output width ``o`` is

    W^{i,o} = Q^i^T x_in W x_out P^o        (both channel axes projected).

Layout ("padded"): the candidates of an axis are stacked as ``[A, c, c]`` with candidate ``a`` in
the first ``c_a`` columns and zeros after, so a candidate kernel is always ``[.., c_in, c_out]``
with zeros outside its top-left ``c_i x c_o`` block, and activations keep the maximal width with
zero channels beyond the chosen one.  The choice is an integer index (a traced value is fine), so
one compiled step serves every architecture.

Initialisations (`init_transforms`): ``ordinal`` (``P^a = [e_1 .. e_{c_a}]``, nested prefixes,
maximal sharing; the candidate kernel is the slice ``W[:c_i, :c_o]``), ``independent`` (blocks of
basis vectors as disjoint as the widths allow: consecutive blocks, wrapping around when the widths
sum to more than ``c``), ``transitional`` (starts ordinal; `efficient_nlp.nas.sharing` anneals it).

P and Q are `Transform` variables, not ``nnx.Param``: the task loss never updates them (the
training step differentiates ``nnx.Param`` only) and the forward pass also reads them through
``stop_gradient``, so even a gradient taken w.r.t. every variable is zero for them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.nas import sharing

SHARING_KINDS = ("ordinal", "independent", "transitional")
_EXACT = jax.lax.Precision.HIGHEST


class Transform(nnx.Variable):
    """An APS transformation matrix stack ``[A, c, c]`` (P or Q); changed only by annealing."""


def _check_widths(widths, c):
    widths = tuple(int(w) for w in widths)
    if not widths or list(widths) != sorted(set(widths)) or widths[0] < 1 or widths[-1] > c:
        raise ValueError(f"candidate widths must be strictly increasing in [1, {c}], got {widths}")
    return widths


def ordinal_transforms(c: int, widths: Sequence[int]) -> np.ndarray:
    """``[A, c, c]``: candidate ``a`` selects the first ``c_a`` channels (``[e_1 .. e_{c_a}]``)."""
    widths = _check_widths(widths, c)
    out = np.zeros((len(widths), c, c), np.float32)
    for a, w in enumerate(widths):
        out[a, np.arange(w), np.arange(w)] = 1.0
    return out


def independent_transforms(c: int, widths: Sequence[int]) -> np.ndarray:
    """``[A, c, c]``: consecutive blocks of basis vectors, candidate after candidate (wrapping
    around ``c``), so the selections are disjoint whenever ``sum(widths) <= c``."""
    widths = _check_widths(widths, c)
    out = np.zeros((len(widths), c, c), np.float32)
    start = 0
    for a, w in enumerate(widths):
        rows = (start + np.arange(w)) % c
        out[a, rows, np.arange(w)] = 1.0
        start = (start + w) % c
    return out


def init_transforms(kind: str, c: int, widths: Sequence[int]) -> np.ndarray:
    """Transforms for a sharing ``kind`` (``transitional`` starts from ``ordinal``)."""
    if kind in ("ordinal", "transitional"):
        return ordinal_transforms(c, widths)
    if kind == "independent":
        return independent_transforms(c, widths)
    raise ValueError(f"unknown sharing kind {kind!r}; choose one of {SHARING_KINDS}")


def width_mask(widths: Sequence[int], index, c: int):
    """``[c]`` float mask, 1 for the first ``widths[index]`` channels (``index`` may be traced)."""
    w = jnp.asarray(widths, jnp.int32)[index]
    return (jnp.arange(c) < w).astype(jnp.float32)


class ApsLayer(nnx.Module):
    """Shared machinery of `ApsDense` and `ApsConv`: meta kernel, bias, P / Q, candidate kernel."""

    def _setup(self, shape, in_widths, out_widths, sharing_kind, use_bias, kernel_init, rngs):
        c_in, c_out = shape[-2], shape[-1]
        self.in_features, self.out_features = c_in, c_out
        self.in_widths = None if in_widths is None else _check_widths(in_widths, c_in)
        self.out_widths = None if out_widths is None else _check_widths(out_widths, c_out)
        self.sharing = sharing_kind
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c_out,), jnp.float32)) if use_bias else None
        self.q = (None if self.in_widths is None else
                  Transform(jnp.asarray(init_transforms(sharing_kind, c_in, self.in_widths))))
        self.p = (None if self.out_widths is None else
                  Transform(jnp.asarray(init_transforms(sharing_kind, c_out, self.out_widths))))

    def candidate(self, i=None, o=None):
        """Padded candidate ``(kernel [.., c_in, c_out], bias [c_out] or None)`` for input choice
        ``i`` and output choice ``o`` (indices into the candidate widths; None for a fixed axis)."""
        w = self.kernel[...]
        b = None if self.bias is None else self.bias[...]
        # HIGHEST: at an accelerator's default precision the projection would round W to
        # bfloat16 / TF32, and an ordinal candidate would no longer be the exact slice of W.
        if self.q is not None:
            q = jax.lax.stop_gradient(self.q[...][0 if i is None else i])
            w = jnp.einsum("...io,ia->...ao", w, q, precision=_EXACT)
        if self.p is not None:
            p = jax.lax.stop_gradient(self.p[...][0 if o is None else o])
            w = jnp.einsum("...io,ob->...ib", w, p, precision=_EXACT)
            b = None if b is None else jnp.matmul(b, p, precision=_EXACT)
        return w, b

    def candidate_kernel(self, i: int | None = None, o: int | None = None):
        """The unpadded ``W^{i,o}`` ``[.., c_i, c_o]`` for static choices ``i``, ``o``."""
        w, _ = self.candidate(i, o)
        ci = self.in_features if self.in_widths is None else self.in_widths[i]
        co = self.out_features if self.out_widths is None else self.out_widths[o]
        return w[..., :ci, :co]

    def candidate_bias(self, o: int | None = None):
        _, b = self.candidate(None, o)
        co = self.out_features if self.out_widths is None else self.out_widths[o]
        return None if b is None else b[:co]

    def sharing_level(self):
        """Phi of this layer (`efficient_nlp.nas.sharing_level`); a fixed axis counts as ``[I]``."""
        eye_in = jnp.eye(self.in_features)[None]
        eye_out = jnp.eye(self.out_features)[None]
        ps = eye_out if self.p is None else self.p[...]
        qs = eye_in if self.q is None else self.q[...]
        return sharing.sharing_level(ps, qs)


class ApsDense(ApsLayer):
    """``y = x W^{i,o} + P^o^T b``; ``in_widths`` / ``out_widths`` None = that axis is not searched."""

    def __init__(self, in_features: int, out_features: int, *, in_widths=None, out_widths=None,
                 sharing: str = "ordinal", use_bias: bool = True,
                 kernel_init=jax.nn.initializers.lecun_normal(), rngs: nnx.Rngs):
        self._setup((in_features, out_features), in_widths, out_widths, sharing, use_bias,
                    kernel_init, rngs)

    def __call__(self, x, i=None, o=None):
        w, b = self.candidate(i, o)
        y = jnp.matmul(x, w)
        return y if b is None else y + b


class ApsConv(ApsLayer):
    """2-D convolution (NHWC, kernel HWIO, SAME padding) with an affine-shared kernel."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *, stride: int = 1,
                 in_widths=None, out_widths=None, sharing: str = "ordinal", use_bias: bool = False,
                 kernel_init=jax.nn.initializers.he_normal(), rngs: nnx.Rngs):
        self.kernel_size, self.stride = int(kernel_size), int(stride)
        self._setup((kernel_size, kernel_size, in_features, out_features), in_widths, out_widths,
                    sharing, use_bias, kernel_init, rngs)

    def __call__(self, x, i=None, o=None):
        w, b = self.candidate(i, o)
        y = jax.lax.conv_general_dilated(
            x, w, (self.stride, self.stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if b is None else y + b


class WidthBatchNorm(nnx.Module):
    """Batch normalisation over (N, H, W) with batch statistics in training *and* evaluation and a
    private affine (scale, bias) per candidate width; channels beyond the chosen width are zeroed.

    Running averages are deliberately absent: one set of averages would be wrong for every other
    width of a supernet.  Statistics are per channel, so padding channels do not disturb them; on
    a sharded batch the mean is over the global batch (XLA inserts the all-reduce).
    """

    def __init__(self, features: int, widths=None, *, epsilon: float = 1e-5):
        self.features = int(features)
        self.widths = (self.features,) if widths is None else _check_widths(widths, features)
        a = len(self.widths)
        self.scale = nnx.Param(jnp.ones((a, features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((a, features), jnp.float32))
        self.epsilon = float(epsilon)

    def __call__(self, x, o=None, weights=None):
        """``weights`` [N] (optional): per-example weights of the statistics (0 = padding row)."""
        o = 0 if o is None else o
        axes = tuple(range(x.ndim - 1))
        if weights is None:
            mean = jnp.mean(x, axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
        else:
            w = jnp.asarray(weights, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            denom = jnp.maximum(jnp.sum(w) * np.prod(x.shape[1:-1]), 1.0)
            mean = jnp.sum(w * x, axes, keepdims=True) / denom
            var = jnp.sum(w * jnp.square(x - mean), axes, keepdims=True) / denom
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...][o] + self.bias[...][o]
        return y * width_mask(self.widths, o, self.features)


def aps_layers(model):
    """``[(path, layer)]`` of every `ApsLayer` inside ``model``."""
    return [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, ApsLayer)]


def model_sharing_level(model):
    """Total Phi of a network: the sum of its APS layers' Phi."""
    return sum((m.sharing_level() for _, m in aps_layers(model)), jnp.zeros(()))


def unit_columns_error(model) -> float:
    """Largest ``| ||column|| - 1 |`` over the non-padding columns of every P and Q (diagnostic)."""
    worst = 0.0
    for _, m in aps_layers(model):
        for t, widths in ((m.p, m.out_widths), (m.q, m.in_widths)):
            if t is None:
                continue
            arr = np.asarray(t[...])
            for a, w in enumerate(widths):
                norms = np.linalg.norm(arr[a, :, :w], axis=0)
                worst = max(worst, float(np.max(np.abs(norms - 1.0))))
    return worst
