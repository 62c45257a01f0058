"""The sharing level Phi of affine parameter sharing, its gradient and the annealing step.

Wang et al. 2020 (docs/nas.md): with transformation matrices ``Q^i`` (input-channel candidates) and ``P^o``
(output-channel candidates) of one layer,

    Phi = sum_{i <= i~} sum_{o <= o~} ||Q^i^T Q^i~||_F^2 * ||P^o^T P^o~||_F^2
        = S(Q) * S(P),       S(T) = sum_{a <= b} ||T^a^T T^b||_F^2   (pairs include a == b).

``||Q^i^T Q^i~||_F^2 ||P^o^T P^o~||_F^2`` is the squared Frobenius norm of the cross-covariance of
the candidate kernels ``W^{i,o}`` and ``W^{i~,o~}`` when the meta weight ``W`` has i.i.d. standard
normal entries, so Phi measures how strongly candidates are coupled.  Ordinal selection (nested
prefixes) maximises it among semi-orthogonal transforms, disjoint selection minimises it.

Matrices are given as a stacked array ``[A, c, m]`` (candidate ``a`` in the first ``c_a`` columns,
the rest zero: the padded layout of `efficient_nlp.nas.aps`) or as a list of ``[c, c_a]`` arrays.
Zero columns contribute nothing, so both layouts give the same value.

Closed-form gradient (``G_a = T^a T^a^T``): ``dS/dT^a = 2 (sum_b G_b + G_a) T^a``, hence
``dPhi/dP^o = S(Q) * 2 (sum_b G^P_b + G^P_o) P^o`` and symmetrically for Q.

Annealing (APS-T): ``p <- normalize(p - tau * dPhi/dp)`` for every column ``p`` (projected gradient
descent on the product of unit spheres); zero (padding) columns stay zero.
"""
from __future__ import annotations

import jax.numpy as jnp


def _stack(ts):
    """A list of ``[c, c_a]`` matrices or a stacked ``[A, c, m]`` array -> ``[A, c, m]``."""
    if isinstance(ts, (list, tuple)):
        ts = [jnp.asarray(t) for t in ts]
        m = max(t.shape[1] for t in ts)
        ts = jnp.stack([jnp.pad(t, ((0, 0), (0, m - t.shape[1]))) for t in ts])
    ts = jnp.asarray(ts)
    if ts.ndim != 3:
        raise ValueError(f"expected [A, c, m] transforms or a list of [c, c_a] matrices, got {ts.shape}")
    return ts


def pair_sum(ts):
    """``S(T) = sum_{a <= b} ||T^a^T T^b||_F^2`` (a == b included) for one axis' transforms."""
    t = _stack(ts)
    g = jnp.einsum("aic,ajc->aij", t, t)            # G_a = T^a T^a^T  [A, c, c]
    m = jnp.einsum("aij,bij->ab", g, g)             # ||T^a^T T^b||_F^2 = <G_a, G_b>
    return jnp.sum(jnp.triu(m))


def pair_sum_grad(ts):
    """``dS/dT`` in the stacked layout: ``2 (sum_b G_b + G_a) T^a`` for every candidate ``a``."""
    t = _stack(ts)
    g = jnp.einsum("aic,ajc->aij", t, t)
    return 2.0 * jnp.einsum("aij,ajc->aic", g + jnp.sum(g, 0, keepdims=True), t)


def sharing_level(Ps, Qs) -> jnp.ndarray:
    """Phi of one layer (docs/nas.md): ``S(Q) * S(P)``; see the module docstring.

    ``Ps``: output-channel transforms ``P^o`` (``[A_out, c_out, m]`` or a list of ``[c_out, c_o]``);
    ``Qs``: input-channel transforms ``Q^i``.  A fixed (unsearched) axis is ``[eye(c)]``.
    """
    return pair_sum(Qs) * pair_sum(Ps)


def sharing_level_grad(Ps, Qs):
    """``(dPhi/dP, dPhi/dQ)`` in closed form, stacked ``[A, c, m]`` like the inputs."""
    sp, sq = pair_sum(Ps), pair_sum(Qs)
    return sq * pair_sum_grad(Ps), sp * pair_sum_grad(Qs)


def normalize_columns(t, eps: float = 1e-12):
    """Every column of ``t [..., c, m]`` scaled to unit norm; zero columns stay zero."""
    norm = jnp.sqrt(jnp.sum(jnp.square(t), axis=-2, keepdims=True))
    return jnp.where(norm > eps, t / jnp.where(norm > eps, norm, 1.0), 0.0)


def projected_step(t, grad, tau):
    """``normalize(t - tau * g)`` per column with ``g`` the gradient's component tangent to the
    unit sphere at the column (``g - (t.g) t``); padding (zero) columns remain zero.

    For small ``tau`` this is the paper's ``normalize(p - tau dPhi/dp)``: the radial component
    is removed by the normalisation anyway, but a large radial gradient (Phi's gradient at the
    ordinal start is exactly radial) would otherwise flip the column when ``tau |g| > 1``.
    """
    alive = jnp.sum(jnp.square(t), axis=-2, keepdims=True) > 0
    radial = jnp.sum(t * grad, axis=-2, keepdims=True)
    tangent = grad - radial * t
    return normalize_columns(jnp.where(alive, t - tau * tangent, 0.0))


def anneal_step(Ps, Qs, tau: float = 1e-3, update: str = "both"):
    """One projected-gradient step decreasing Phi of one layer; ``update`` in {"p", "q", "both"}.

    The paper alternates: P fixed while Q updates for some steps, then the reverse
    (``efficient_nlp.nas.search`` does that with ``anneal_period``).  Returns stacked ``(Ps, Qs)``.
    """
    if update not in ("p", "q", "both"):
        raise ValueError(f"update must be 'p', 'q' or 'both', got {update!r}")
    p, q = _stack(Ps), _stack(Qs)
    dp, dq = sharing_level_grad(p, q)
    if update in ("p", "both"):
        p = projected_step(p, dp, tau)
    if update in ("q", "both"):
        q = projected_step(q, dq, tau)
    return p, q
