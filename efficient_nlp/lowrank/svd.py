"""Truncated (weighted) SVD of a Linear kernel and the choice of ranks (docs/lowrank.md).

Kernels are in Flax layout, ``W [d_in, d_out]`` with ``y = x @ W``.  A rank-``r`` factorisation
``W ~ A @ B`` (``A [d_in, r]``, ``B [r, d_out]``) replaces one matmul by two; it holds fewer
parameters (and multiply-adds) only when ``r (d_in + d_out) < d_in d_out`` (`break_even_rank`).

Weighted SVD: with positive weights ``g [d_in]`` on the input rows and ``c [d_out]`` on the
output columns, the best rank-``r`` ``X`` in the weighted norm ``||diag(g) (W - X) diag(c)||_F``
is ``diag(g)^-1 M_r diag(c)^-1``, ``M_r`` the truncated SVD of ``M = diag(g) W diag(c)``
(Eckart-Young on ``M``); its squared error is the sum of the discarded ``sigma_i(M)^2``.

* FWSVD (Hsu et al. 2022, "Language model compression with weighted low-rank factorization"):
  one weight per OUTPUT unit (``col_scale``, the columns of a Flax kernel; the rows of a torch
  ``Linear.weight``): ``c_j = sqrt(sum_i F_ij)``, ``F`` the Fisher information of the task loss,
  estimated by summed squared gradients (`fisher_weights`).
* Activation-aware SVD (ASVD, Yuan et al. 2023): one weight per INPUT channel (``row_scale``,
  the rows of a Flax kernel): ``g_i = mean_t(|x_ti|)^alpha``, alpha = 0.5 by default
  (`activation_weights`), so channels that carry large activations are approximated better.

The singular values are split evenly, ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` (before the
weights are undone), so both factors have the same scale: what training the factors wants.
"""
from __future__ import annotations

import heapq
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Data-derived weights are floored at this fraction of their maximum: a unit that saw no
#: gradient / no activation keeps a tiny positive weight, so ``diag(w)^-1`` stays finite.
WEIGHT_FLOOR = 1e-6


def _matrix(kernel) -> np.ndarray:
    w = np.asarray(kernel, np.float32)
    if w.ndim != 2:
        raise ValueError(f"a Linear kernel [d_in, d_out] is 2-D, got shape {w.shape}")
    return w


def _weights(scale, n: int, name: str) -> np.ndarray | None:
    if scale is None:
        return None
    s = np.asarray(scale, np.float32)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {s.shape}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError(f"{name} must be finite and > 0 (min {float(np.min(s))}); floor data-derived weights, "
                         "e.g. with fisher_weights / activation_weights")
    return s


def _weighted(kernel, row_scale, col_scale):
    """``(diag(row) W diag(col), row, col)`` with the weights validated (None = no weight)."""
    w = _matrix(kernel)
    row = _weights(row_scale, w.shape[0], "row_scale (one weight per input row, d_in)")
    col = _weights(col_scale, w.shape[1], "col_scale (one weight per output column, d_out)")
    m = w if row is None else w * row[:, None]
    return (m if col is None else m * col[None, :]), row, col


class Decomposition(NamedTuple):
    """The SVD ``U diag(s) V^T`` of the weighted kernel ``diag(row) W diag(col)`` (a missing
    weight is all ones)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    row: np.ndarray | None
    col: np.ndarray | None

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(A [d_in, r], B [r, d_out])``: the weights undone on the balanced factors."""
        limit = len(self.s)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
            raise ValueError(f"rank must be an int in [1, {limit}] (min(d_in, d_out)), got {rank!r}")
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root[None, :]
        b = root[:, None] * self.vt[:rank]
        if self.row is not None:
            a = a / self.row[:, None]
        if self.col is not None:
            b = b / self.col[None, :]
        return a.astype(np.float32), b.astype(np.float32)

    def energy(self, rank: int) -> float:
        """Fraction of the (weighted) squared Frobenius norm that rank ``rank`` keeps."""
        return kept_energy(self.s, rank)


def decompose(kernel, *, row_scale=None, col_scale=None) -> Decomposition:
    """The thin SVD of ``diag(row_scale) W diag(col_scale)`` (float32, ``jnp.linalg.svd``: XLA's
    LAPACK, which shares the CPU with the model's own threads better than NumPy's)."""
    m, row, col = _weighted(kernel, row_scale, col_scale)
    u, s, vt = (np.asarray(x) for x in jax.device_get(jnp.linalg.svd(m, full_matrices=False)))
    return Decomposition(u, s, vt, row, col)


def truncated(kernel, rank: int, *, row_scale=None, col_scale=None) -> tuple[np.ndarray, np.ndarray]:
    """``(a [d_in, r], b [r, d_out])`` with ``a @ b`` the best rank-``r`` approximation of the
    kernel ``W [d_in, d_out]`` in the norm weighted by ``row_scale [d_in]`` (input rows, ASVD)
    and ``col_scale [d_out]`` (output columns, FWSVD); plain SVD without weights.  The singular
    values are split as ``sqrt(S)`` into both factors (module docstring)."""
    return decompose(kernel, row_scale=row_scale, col_scale=col_scale).factors(rank)


def singular_values(kernel, *, row_scale=None, col_scale=None) -> np.ndarray:
    """Singular values (descending) of ``diag(row_scale) W diag(col_scale)``."""
    return np.asarray(jax.device_get(jnp.linalg.svd(_weighted(kernel, row_scale, col_scale)[0], compute_uv=False)))


def _energies(singular_values) -> np.ndarray:
    """Cumulative kept energy ``e[r-1] = sum_{i<r} s_i^2 / sum s_i^2`` (float64; all ones for a
    zero matrix)."""
    s2 = np.asarray(singular_values, np.float64) ** 2
    if s2.ndim != 1 or len(s2) == 0:
        raise ValueError(f"singular values must be a non-empty 1-D array, got shape {s2.shape}")
    cum = np.cumsum(s2)
    return np.ones_like(cum) if cum[-1] == 0 else cum / cum[-1]


def kept_energy(singular_values, rank: int) -> float:
    """``sum_{i<rank} s_i^2 / sum_i s_i^2``."""
    return float(_energies(singular_values)[rank - 1])


def rank_for_energy(singular_values, energy: float) -> int:
    """The smallest ``r`` with ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2``; ``energy`` in (0, 1]."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    cum = _energies(singular_values)
    return int(min(np.searchsorted(cum, energy * (1 - 1e-12), side="left") + 1, len(cum)))


def break_even_rank(d_in: int, d_out: int) -> int:
    """The largest ``r`` with ``r (d_in + d_out) < d_in d_out``: ranks up to it save parameters
    and multiply-adds (0 when no rank does)."""
    return max((d_in * d_out - 1) // (d_in + d_out), 0)


def fisher_weights(fisher) -> np.ndarray:
    """FWSVD's output-column weights ``c_j = sqrt(sum_i F_ij)`` from the Fisher information
    ``F [d_in, d_out]`` (summed squared gradients of a Flax kernel), floored at
    `WEIGHT_FLOOR` times their maximum."""
    f = np.asarray(fisher, np.float64)
    if f.ndim != 2:
        raise ValueError(f"the Fisher information of a kernel is [d_in, d_out], got shape {f.shape}")
    return _floored(np.sqrt(np.sum(f, axis=0)), "Fisher information (no gradient reached this kernel)")


def activation_weights(mean_abs, alpha: float = 0.5) -> np.ndarray:
    """ASVD's input-row weights ``g_i = mean|x_i|^alpha`` from the mean absolute input of each
    channel ``[d_in]``, floored at `WEIGHT_FLOOR` times their maximum."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"alpha must be a number > 0 (ASVD uses 0.5), got {alpha!r}")
    m = np.asarray(mean_abs, np.float64)
    if m.ndim != 1:
        raise ValueError(f"input scales are one value per input channel [d_in], got shape {m.shape}")
    return _floored(m ** alpha, "input scales (the site saw only zero inputs)")


def _floored(w: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{what}: weights must be finite and >= 0")
    top = float(np.max(w))
    if top <= 0:
        raise ValueError(f"{what}: all weights are zero")
    return np.maximum(w, WEIGHT_FLOOR * top).astype(np.float32)


def choose_ranks(spectra: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]], budget: float, *,
                 cost: str = "params", tokens=1) -> dict[str, int | None]:
    """Ranks of several sites maximising their summed kept energy under one cost budget.

    Every site ``i`` (``shapes[i] = (d_in, d_out)``, ``spectra[i]`` its ``min(d_in, d_out)``
    singular values, descending) gains ``p_ij = s_ij^2 / sum_k s_ik^2`` (its energy, normalised
    per site, so every site counts alike) for its ``j``-th rank, at a cost of ``d_in + d_out``
    parameters (``cost="params"``) or ``2 t (d_in + d_out)`` FLOPs (``cost="flops"``, ``t`` =
    ``tokens``: one int, or one per site for sites that read different numbers of tokens).  The
    budget is ``budget`` times the dense cost of the sites (``d_in d_out`` each).

    Greedy allocation: every site starts at rank 1; then the upgrade with the largest gain per
    cost is taken while it fits: the next rank of a site, or, at its break-even rank
    (`break_even_rank`), the switch to the dense kernel (gain the rest of its energy, cost the
    dense kernel minus the factors).  A site whose next upgrade does not fit stops there.  As the
    gains of a site decrease with its rank, this is the optimum of the continuous relaxation (a
    fractional knapsack).  A site whose break-even rank is 0 stays dense from the start.

    Returns ``{site: rank}``, ``None`` for a site kept dense.  ValueError when the budget does
    not pay for rank 1 everywhere (it names the smallest budget that does).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget is a fraction of the dense cost of the sites, in (0, 1]; got {budget!r}")
    if cost not in ("params", "flops"):
        raise ValueError(f"cost must be 'params' or 'flops', got {cost!r}")
    if set(spectra) != set(shapes):
        raise ValueError(f"spectra and shapes must name the same sites; only in spectra: "
                         f"{sorted(set(spectra) - set(shapes))}, only in shapes: {sorted(set(shapes) - set(spectra))}")
    if not spectra:
        raise ValueError("choose_ranks needs at least one site")
    per_site_tokens = tokens if isinstance(tokens, Mapping) else {site: tokens for site in shapes}
    unit, dense, gain, limit_rank, rank = {}, {}, {}, {}, {}
    for site, (d_in, d_out) in shapes.items():
        s = np.asarray(spectra[site], np.float64)
        if s.shape != (min(d_in, d_out),):
            raise ValueError(f"{site}: needs all min(d_in, d_out) = {min(d_in, d_out)} singular values, "
                             f"got shape {s.shape}")
        t = per_site_tokens.get(site) if cost == "flops" else 1
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"{site}: tokens must be an int >= 1, got {t!r}")
        scale = 2 * int(t) if cost == "flops" else 1
        unit[site], dense[site] = scale * (d_in + d_out), scale * d_in * d_out
        total = float(np.sum(s * s))
        gain[site] = s * s / total if total > 0 else np.full_like(s, 1.0 / len(s))
        limit_rank[site] = break_even_rank(d_in, d_out)
        rank[site] = 1 if limit_rank[site] >= 1 else None
    spent = sum(unit[x] if rank[x] is not None else dense[x] for x in shapes)
    limit = budget * sum(dense.values())
    if spent > limit * (1 + 1e-12):
        raise ValueError(f"a budget of {budget} pays for less than rank 1 at every site; the smallest budget "
                         f"is {spent / sum(dense.values()):.4g}")
    order = {site: k for k, site in enumerate(shapes)}

    def upgrade(site):
        r = rank[site]
        if r is None:
            return None
        if r < limit_rank[site]:
            return gain[site][r], unit[site]
        return float(np.sum(gain[site][r:])), dense[site] - r * unit[site]

    heap = []
    for site in shapes:
        up = upgrade(site)
        if up is not None:
            heapq.heappush(heap, (-up[0] / up[1], order[site], site, up[1]))
    while heap:
        _, _, site, step = heapq.heappop(heap)
        if spent + step > limit * (1 + 1e-12):
            continue
        spent += step
        rank[site] = None if rank[site] == limit_rank[site] else rank[site] + 1
        up = upgrade(site)
        if up is not None:
            heapq.heappush(heap, (-up[0] / up[1], order[site], site, up[1]))
    return rank


__all__ = ["Decomposition", "WEIGHT_FLOOR", "activation_weights", "break_even_rank", "choose_ranks", "decompose",
           "fisher_weights", "kept_energy", "rank_for_energy", "singular_values", "truncated"]
