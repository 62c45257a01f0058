"""Loss sharpness per Transformer part: the top Hessian eigenvalue of the loss with respect to the
weights of one part (and layer), by power iteration on Hessian-vector products (BinaryBERT's
loss-landscape argument, Bai et al. 2021: binary models sit in sharper, harder-to-train regions
than ternary and full-precision ones).

    rows = part_sharpness(model, data)        # data: a few batches stacked [nb, B, T]
    plot_sharpness({"fp32": fp_rows, "ternary": t_rows, "binary": b_rows}, "sharpness.png")

What is differentiated
----------------------
With a straight-through estimator the loss of a quantized model is piecewise constant in the
latent weights, so their Hessian is zero almost everywhere and says nothing.  Instead the free
variables are the *dequantized* weights ``w_hat = Q(w)`` of the chosen part: `at_quantized_weights`
writes ``Q(w)`` into a copy of the model and freezes its weight quantizers, and we take the
Hessian of ``L(w_hat)`` at that point, i.e. the curvature of the loss along weight perturbations
of a model that already sits on the quantization grid.  Activation quantizers stay in the graph
with the derivative the training step sees (the STE: identity inside the range; per-token
ranges are constants), so this is the curvature of the loss surrogate QAT optimises.  For a
full-precision model it is the ordinary Hessian.

Which eigenvalue
----------------
Power iteration ``v <- H v / |H v|`` converges to an eigenvector of the eigenvalue of largest
*magnitude* (``dominant``; its Rayleigh quotient ``v^T H v``).  The loss at a trained point can
have negative curvature directions, so `top_eigenvalue` returns the largest *algebraic*
eigenvalue ``top`` (the sharpness): if ``dominant >= 0`` it is ``top``; otherwise a second power
iteration on ``H - dominant * I`` (all eigenvalues >= 0, largest ``top - dominant``) gives it.
Both are returned.  Stopping: the Rayleigh quotient changes by at most ``tol * |value|`` between
two iterations, or ``max_iter`` iterations (``converged`` says which); the start vector is a
seeded Gaussian.  Each iteration costs one forward-over-reverse Hessian-vector product
(``jax.jvp`` of ``jax.grad``), about three forward passes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant.adaptive import group_sites
from efficient_nlp.quant.export import quantized_weights
from efficient_nlp.quant.modules import QuantLinear


# ----------------------------------------------------------------------------- power iteration
def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _scale(v, c):
    return jax.tree.map(lambda x: c * x, v)


@functools.partial(jax.jit, static_argnames=("matvec", "max_iter"))
def _power(matvec, args, v0, shift, tol, max_iter):
    """Power iteration on ``matvec(args, .) - shift * I``: ``(Rayleigh quotient, iterations,
    converged)``; ``matvec`` is static (hashable: reuse one object to reuse the compilation)."""
    def apply(v):
        return jax.tree.map(lambda hv, x: hv - shift * x, matvec(args, v), v)

    def normalise(v):
        return _scale(v, 1.0 / jnp.maximum(jnp.sqrt(_dot(v, v)), 1e-30))

    def step(state):
        i, v, lam, _ = state
        w = apply(v)
        new = _dot(v, w)
        done = jnp.abs(new - lam) <= tol * jnp.abs(new)
        return i + 1, normalise(w), new, done

    def cond(state):
        i, _, _, done = state
        return (i < max_iter) & ~done

    v = normalise(v0)
    init = (jnp.int32(0), v, jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(False))
    i, _, lam, done = jax.lax.while_loop(cond, step, init)
    return lam, i, done


@dataclasses.dataclass(frozen=True)
class EigenResult:
    """``top``: largest algebraic eigenvalue; ``dominant``: eigenvalue of largest magnitude;
    ``iterations`` (both power iterations together) and ``converged`` (both within ``tol``)."""

    top: float
    dominant: float
    iterations: int
    converged: bool


def top_eigenvalue(matvec, args, v0, *, tol: float = 1e-3, max_iter: int = 100) -> EigenResult:
    """The top eigenvalue of the symmetric operator ``v -> matvec(args, v)`` on pytrees like
    ``v0`` (module docstring: which eigenvalue, stopping rule).  ``matvec`` must be a hashable
    function of ``(args, v)`` (a module-level function or one object reused: it is a static
    argument of the jitted loop)."""
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"top_eigenvalue: need tol > 0 and max_iter >= 1, got tol={tol}, max_iter={max_iter}")
    dom, n, ok = _power(matvec, args, v0, 0.0, tol, max_iter)
    dom, n, ok = float(dom), int(n), bool(ok)
    if dom >= 0:
        return EigenResult(dom, dom, n, ok)
    gap, n2, ok2 = _power(matvec, args, v0, dom, tol, max_iter)
    return EigenResult(dom + float(gap), dom, n + int(n2), ok and bool(ok2))


# ----------------------------------------------------------------------------- models
def classification_loss(model, batch):
    """Mean cross-entropy of the model's logits against ``batch["labels"]`` (eval mode)."""
    logits = F.forward(model, batch).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def at_quantized_weights(model):
    """A copy of ``model`` whose quantized weights hold their dequantized values ``Q(w)`` and
    whose weight quantizers are frozen (pass-through): the same function, now differentiable
    in ``Q(w)`` (module docstring).  A model without quantized weights is just copied."""
    model = train.copy_model(model)
    for _, mod, attr in quantized_weights(model):
        var = getattr(mod, attr)
        var[...] = mod.weight_quant(var[...])
        mod.weight_quant.frozen = True
    return model


def layer_sites(model) -> list[str]:
    """Module paths of the layer stack's matmul sites that are Linear layers (float or
    quantized), layer by layer in role order (`efficient_nlp.models.family.sites`: Q, K, V, O,
    FFN-in, FFN-gate, FFN-out)."""
    return [s.path for s in F.sites(model) if isinstance(F.get_module(model, s.path), (nnx.Linear, QuantLinear))]


def _kernel_filter(sites):
    sites = frozenset(sites)

    def select(path, _):
        return path[-1] == "kernel" and ".".join(str(p) for p in path[:-1]) in sites

    return select


def _model_hvp(graphdef, loss_fn, args, v):
    """``mask * H (mask * v)`` of the mean of ``loss_fn`` over the stacked batches."""
    params, rest, data, mask = args

    def loss(p):
        model = nnx.merge(graphdef, p, rest)
        return jnp.mean(jax.lax.map(lambda b: loss_fn(model, b), data))

    v = jax.tree.map(jnp.multiply, mask, v)
    hv = jax.jvp(jax.grad(loss), (params,), (v,))[1]
    return jax.tree.map(jnp.multiply, mask, hv)


def part_sharpness(model, data, *, loss_fn=classification_loss, sites=None, by: str = "part_layer",
                   seed: int = 0, tol: float = 1e-3, max_iter: int = 100) -> list[dict]:
    """Top Hessian eigenvalue of ``loss_fn`` per group of kernels (module docstring).

    ``model``: a float or fake-quantized model (quantized weights are differentiated at their
    dequantized values, `at_quantized_weights`); ``data``: a dict of arrays stacked
    ``[num_batches, B, ...]`` (the loss is the mean over batches); ``loss_fn(model, batch) ->
    scalar``; ``sites``: kernels to consider (default `layer_sites`), grouped by
    `efficient_nlp.quant.adaptive.group_sites` with ``by``.  Returns one dict per group:
    ``group, part, layer, params, top, dominant, iterations, converged``.  The HVP is compiled
    once per model; each group masks the direction to its own kernels.
    """
    model = at_quantized_weights(model)
    sites = layer_sites(model) if sites is None else list(sites)
    if not sites:
        raise ValueError("part_sharpness: no Transformer-layer Linear sites in the model; pass sites=")
    groups = group_sites(sites, by)
    graphdef, params, rest = nnx.split(model, _kernel_filter(sites), ...)
    found = {_site_of(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(sites) - found)
    if missing:
        raise ValueError(f"part_sharpness: no kernel at site(s) {missing}")
    data = {k: jnp.asarray(v) for k, v in data.items()}
    if any(np.ndim(v) < 2 for v in data.values()):
        raise ValueError("part_sharpness: data must be batches stacked [num_batches, B, ...]")
    matvec = functools.partial(_model_hvp, graphdef, loss_fn)
    noise = jax.tree.map(lambda x, k: jax.random.normal(k, x.shape, x.dtype), params,
                         _keys_like(params, jax.random.key(seed)))
    rows = []
    for g in groups:
        inside = set(g.sites)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.full_like(x, 1.0 if _site_of(path) in inside else 0.0), params)
        v0 = jax.tree.map(jnp.multiply, mask, noise)
        r = top_eigenvalue(matvec, (params, rest, data, mask), v0, tol=tol, max_iter=max_iter)
        size = sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(mask))
        rows.append(dict(group=g.name, part=g.part, layer=g.layer, params=size, top=r.top, dominant=r.dominant,
                         iterations=r.iterations, converged=r.converged))
    return rows


def _site_of(key_path) -> str:
    """The module path of a kernel leaf of an ``nnx.State`` (its dict keys, without ``kernel``)."""
    names = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    return ".".join(names[:-1])


def _keys_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


# ----------------------------------------------------------------------------- plot
def plot_sharpness(results: dict, path: str, *, title: str = "") -> str:
    """A PNG comparing models (``{label: part_sharpness rows}``, e.g. fp32 / ternary / binary).

    Rows with a layer (``by="part_layer"``): one panel per part, the top eigenvalue per layer,
    one line per model; rows without (``by="part"`` / ``"layer"``): grouped bars per group.
    Symlog y scale (eigenvalues may be negative)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = all(r["layer"] is not None and r["part"] is not None for rows in results.values() for r in rows)
    if per_layer:
        parts = list(dict.fromkeys(r["part"] for rows in results.values() for r in rows))
        fig, axes = plt.subplots(1, len(parts), figsize=(3.0 * len(parts), 2.8), squeeze=False, sharey=True)
        for ax, part in zip(axes[0], parts):
            for label, rows in results.items():
                pts = sorted((r["layer"], r["top"]) for r in rows if r["part"] == part)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_title(part, fontsize=9)
            ax.set_xlabel("layer")
        axes = axes[0]
    else:
        names = list(dict.fromkeys(r["group"] for rows in results.values() for r in rows))
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.0))
        width = 0.8 / max(len(results), 1)
        for k, (label, rows) in enumerate(results.items()):
            top = {r["group"]: r["top"] for r in rows}
            xs = [i + k * width for i, n in enumerate(names) if n in top]
            ax.bar(xs, [top[n] for n in names if n in top], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
        axes = [ax]
    for ax in axes:
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("top Hessian eigenvalue")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title or "sharpness per Transformer part")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["EigenResult", "top_eigenvalue", "classification_loss", "at_quantized_weights", "layer_sites",
           "part_sharpness", "plot_sharpness"]
