"""Factorised NNX modules: a Linear as two Linears, an embedding as a table and a projection.

Both are made of ordinary ``nnx.Linear`` / ``nnx.Embed`` submodules, so every other transform
(quantization, pruning, LoRA) sees two plain Linears where one was: ``...query.down.kernel``
``[d_in, r]`` and ``...query.up.kernel`` ``[r, d_out]`` (+ ``...query.up.bias``).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class LowRankLinear(nnx.Module):
    """``y = up(down(x)) = (x @ A) @ B + bias``: a ``d_in -> d_out`` Linear of rank ``r``
    (``r (d_in + d_out)`` weights instead of ``d_in d_out``; docs/lowrank.md)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be an int in [1, {min(in_features, out_features)}] (min(d_in, d_out) of a "
                             f"{in_features} -> {out_features} Linear), got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dtype = dtype
        self.down = nnx.Linear(in_features, rank, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(rank, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @classmethod
    def like(cls, linear: nnx.Linear, rank: int, *, rngs: nnx.Rngs | None = None) -> "LowRankLinear":
        """A freshly initialised rank-``rank`` module with ``linear``'s shape, bias and dtypes."""
        return cls(linear.in_features, linear.out_features, rank, use_bias=linear.bias is not None,
                   dtype=linear.dtype, param_dtype=linear.kernel.get_value().dtype, rngs=rngs or nnx.Rngs(0))

    @classmethod
    def from_factors(cls, linear: nnx.Linear, a, b) -> "LowRankLinear":
        """The module with ``down.kernel = a [d_in, r]``, ``up.kernel = b [r, d_out]`` and
        ``linear``'s bias (same values, the parameter dtype of ``linear``)."""
        new = nnx.eval_shape(lambda: cls.like(linear, int(a.shape[1])))  # every value is set below
        dtype = linear.kernel.get_value().dtype
        if tuple(a.shape) != (linear.in_features, new.rank) or tuple(b.shape) != (new.rank, linear.out_features):
            raise ValueError(f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not factor a "
                             f"{linear.in_features} -> {linear.out_features} Linear")
        new.down.kernel.set_value(jnp.asarray(a, dtype))
        new.up.kernel.set_value(jnp.asarray(b, dtype))
        if linear.bias is not None:
            new.up.bias.set_value(linear.bias.get_value())
        return new

    def __call__(self, x):
        return self.up(self.down(x))


class FactorizedEmbed(nnx.Module):
    """ALBERT's factorised embedding (Lan et al. 2020): a ``V x r`` table ``embedding`` then an
    ``r x E`` projection (``projection``, no bias): ``V r + r E`` weights instead of ``V E``.

    ``attend(x)`` is the tied LM head ``x @ T^T`` of the product table ``T = E_tab P`` computed
    without forming it: ``(x @ P^T) @ E_tab^T``.  Holds ``num_embeddings`` (V), ``features`` (E,
    the output width), ``dim`` (r) and ``dtype`` like the ``nnx.Embed`` it replaces."""

    def __init__(self, num_embeddings: int, features: int, dim: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= min(num_embeddings, features):
            raise ValueError(f"dim must be an int in [1, {min(num_embeddings, features)}] (min(vocab, features)), "
                             f"got {dim!r}")
        self.num_embeddings, self.features, self.dim = num_embeddings, features, dim
        self.dtype = dtype
        self.embedding = nnx.Embed(num_embeddings, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.projection = nnx.Linear(dim, features, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids):
        return self.projection(self.embedding(ids))

    def attend(self, x):
        """``x [..., E] -> [..., V]``: ``x`` against every row of the product table."""
        kernel = self.projection.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        return self.embedding.attend(jnp.matmul(jnp.asarray(x, dtype), kernel.T.astype(dtype)))


__all__ = ["FactorizedEmbed", "LowRankLinear"]
