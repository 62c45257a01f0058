"""One-shot pruning of one linear layer: SparseGPT, Wanda and the magnitude baseline
(docs/oneshot.md).

Kernels are Flax ``[d_in, d_out]`` (``y = x @ kernel``); the papers' ``W`` is ``[out, in]``,
so their "row" (one output neuron) is our *column*.  Every method ranks weights within each
output column (each output neuron keeps its best inputs) and meets the target exactly:

* unstructured ``sparsity`` in [0, 1): ``round(sparsity * d_in)`` weights pruned in every
  output column (round half to even, as `efficient_nlp.prune.make_masks` counts);
* ``n_m = (N, M)``: in every M consecutive inputs of a column, N are KEPT and M - N pruned, the
  convention of `efficient_nlp.prune.n_m` and of sparse tensor cores (2:4 keeps 2 of every 4;
  the sparsity is ``1 - N/M``).  The SparseGPT / Wanda reference code counts the pruned ones
  instead; for 2:4 and 4:8 both read the same.  ``d_in`` must be a multiple of M.

Masks are keep masks (True = kept), as everywhere in `efficient_nlp.prune`.  Calibration
``inputs`` are `efficient_nlp.quant.rounding.InputStats` or an array ``[n, d_in]``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.prune.masks import _check_sparsity, _count
from efficient_nlp.prune.patterns import nm_mask, topk_mask
from efficient_nlp.quant import rounding as G
from efficient_nlp.quant.quantizers import check_group_size


class Sparse(NamedTuple):
    """`sparsegpt`'s result: ``kernel`` ``[d_in, d_out]`` (pruned, updated, and on the grid with
    ``bits``), ``mask`` (bool keep mask) and ``scales`` (``[1, d_out]`` or
    ``[d_in // g, 1, d_out]`` with ``bits``, else None)."""

    kernel: jax.Array
    mask: jax.Array
    scales: jax.Array | None


def _pattern(d_in: int, sparsity, n_m, where: str):
    """``(sparsity, n_m)`` validated: one of an unstructured sparsity or an N:M pattern."""
    if n_m is None:
        if sparsity is None:
            raise ValueError(f"{where}: give a sparsity in [0, 1) or an N:M pattern n_m=(N, M)")
        _check_sparsity(sparsity, where)
        return float(sparsity), None
    ok = isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)
    if not ok or not 0 < n_m[0] <= n_m[1]:
        raise ValueError(f"{where}: n_m must be (N, M) ints with 0 < N <= M (keep N of every M consecutive inputs), "
                         f"got {n_m!r}")
    n, m = int(n_m[0]), int(n_m[1])
    if d_in % m:
        raise ValueError(f"{where}: N:M groups run along d_in, which must be a multiple of M; d_in={d_in}, M={m}")
    if sparsity is not None and abs(float(sparsity) - (1 - n / m)) > 1e-9:
        raise ValueError(f"{where}: sparsity {sparsity!r} disagrees with n_m={n}:{m} (keeps {n} of {m}, sparsity "
                         f"{1 - n / m:g}); pass sparsity=None with n_m")
    return None, (n, m)


@functools.partial(jax.jit, static_argnames=("n_m",))
def _masked(w, scores, k, n_m):
    """``(w * mask, mask)``: the keep mask of ``scores [d_in, d_out]`` prunes the lowest ``k`` of
    each column (or all but the N highest of each M consecutive rows)."""
    if n_m is not None:
        mask = nm_mask(scores, n_m[0], n_m[1], axis=0)
    else:
        mask = jax.vmap(topk_mask, (1, None), 1)(scores, k)
    return jnp.where(mask, w, 0.0), mask


def _select(w, scores, sparsity, n_m):
    return _masked(w, scores, 0 if n_m is not None else _count(sparsity, w.shape[0]), n_m)


def magnitude(kernel, sparsity=None, n_m=None):
    """Magnitude pruning within each output column: ``(kernel * mask, mask)``, pruning the
    smallest ``|W_ij|`` of column ``j`` (ties: the lower input index first).  The data-free
    baseline of Wanda and SparseGPT (the network-wide variant is `efficient_nlp.prune.make_masks`)."""
    w = G.check_kernel(kernel, "magnitude")
    sparsity, n_m = _pattern(w.shape[0], sparsity, n_m, "magnitude")
    return _select(w, jnp.abs(w), sparsity, n_m)


def wanda(kernel, inputs, sparsity=None, n_m=None):
    """Wanda (Sun et al. 2023, eq. 1): score ``|W_ij| * ||X_i||_2`` (our kernel's row ``i`` is
    input channel ``i``; the norm runs over every calibration token), the lowest pruned within
    each output column, no weight update.  Returns ``(kernel * mask, mask)``."""
    w = G.check_kernel(kernel, "wanda")
    sparsity, n_m = _pattern(w.shape[0], sparsity, n_m, "wanda")
    stats = G.as_stats(inputs, w.shape, "wanda")
    return _select(w, jnp.abs(w) * jnp.sqrt(stats.sumsq)[:, None], sparsity, n_m)


def sparsegpt(kernel, inputs, sparsity=None, n_m=None, bits=None, group_size=None, damp=0.01,
              block_size=128) -> Sparse:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune and reconstruct in one sweep.

    Same ``H``, damping, dead inputs and upper Cholesky factor ``U`` of ``H^-1`` as
    `efficient_nlp.quant.rounding.gptq`; input rows are processed in order with the error feedback
    ``e = (w_i - q(w_i)) / U_ii``, ``w_j -= U_ij e`` for ``j > i``, where a pruned weight has
    ``q = 0`` and a kept one ``q = w`` (or its quantized value with ``bits``).  The mask is
    chosen from the weights as updated so far by the smallest ``w^2 / U_ii^2`` (the OBS error
    of removing it): unstructured, at the start of each block of ``block_size`` rows (the
    paper's adaptive mask selection); N:M, for each M consecutive rows when the sweep reaches
    them (as the reference code).

    Where we differ: the reference picks one threshold over a block's rows of every output, so
    one output may keep more than another; we prune per output column, ``round(sparsity * r)``
    rows among the first ``r`` at each block boundary, so every column meets the sparsity
    exactly (module docstring).

    ``bits``: the kept weights are also quantized on our grid in the same sweep (joint
    SparseGPT + GPTQ, the paper's section 3.5), scales as in ``gptq`` (per channel from the
    weights before the sweep, or ``group_size`` groups when the sweep reaches them; over every
    weight of the group, pruned or not).  Returns `Sparse` ``(kernel, mask, scales)``; pruned
    weights are exactly 0.
    """
    w = G.check_kernel(kernel, "sparsegpt")
    sparsity, n_m = _pattern(w.shape[0], sparsity, n_m, "sparsegpt")
    if bits is not None:
        bits = G.check_bits(bits, "sparsegpt")
    elif group_size is not None:
        raise ValueError("sparsegpt: group_size sets the quantization groups; give bits with it (or drop it)")
    g = None if group_size is None else check_group_size(w.shape[0], group_size, "sparsegpt")
    out = G.sweep(w, inputs, bits=bits, group_size=g, damp=damp, block_size=block_size, sparsity=sparsity,
                  n_m=n_m, where="sparsegpt")
    return Sparse(out.values, out.keep, out.scales)


__all__ = ["Sparse", "magnitude", "wanda", "sparsegpt"]
