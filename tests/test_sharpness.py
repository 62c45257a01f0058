"""Sharpness (top Hessian eigenvalue by power iteration on Hessian-vector products)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import quant
from efficient_nlp.quant import sharpness

import _tiny  # tests/_tiny.py

H, N, I, C, T = 8, 2, 8, 3, 6


def quadratic_hvp(a, v):
    """HVP of 0.5 x^T A x by forward-over-reverse (the Hessian is A)."""
    def loss(x):
        return 0.5 * x["x"] @ a @ x["x"]
    return jax.jvp(jax.grad(loss), (v,), (v,))[1]


def symmetric(eigenvalues, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues)) @ q.T


@pytest.mark.parametrize("eigenvalues, top, dominant", [
    ([3.0, 1.0, 0.5, -0.2, 0.1], 3.0, 3.0),
    ([3.0, 1.0, -5.0, 0.5, 0.0], 3.0, -5.0),          # a negative eigenvalue of larger magnitude
    ([-1.0, -4.0, -2.0], -1.0, -4.0),                 # negative definite: top is the least negative
])
def test_power_iteration_on_explicit_quadratic(eigenvalues, top, dominant):
    a = jnp.asarray(symmetric(eigenvalues, len(eigenvalues)), jnp.float32)
    exact = np.linalg.eigvalsh(np.asarray(a, np.float64))
    v0 = {"x": jax.random.normal(jax.random.key(0), (len(eigenvalues),))}
    r = sharpness.top_eigenvalue(quadratic_hvp, a, v0, tol=1e-7, max_iter=2000)
    assert r.converged
    np.testing.assert_allclose(r.top, exact.max(), rtol=1e-4)
    np.testing.assert_allclose(r.dominant, exact[np.argmax(np.abs(exact))], rtol=1e-4)
    np.testing.assert_allclose((r.top, r.dominant), (top, dominant), rtol=1e-4)


def test_iteration_cap_is_reported():
    a = jnp.asarray(symmetric([1.0, 0.99, 0.5], 1), jnp.float32)
    r = sharpness.top_eigenvalue(quadratic_hvp, a, {"x": jnp.ones(3)}, tol=1e-12, max_iter=3)
    assert r.iterations == 3 and not r.converged


def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, vocab=30, hidden=H, layers=1, heads=N, intermediate=I, labels=C, positions=8,
                           noise=0.3)


def stacked_data(num_batches=2, b=4):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(num_batches, b, T)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, C, size=(num_batches, b)).astype(np.int32)}


def dense_top(model, data, sites):
    """Largest eigenvalue of the dense jax.hessian of the mean loss w.r.t. the sites' kernels."""
    def select(path, _):
        return path[-1] == "kernel" and ".".join(str(p) for p in path[:-1]) in sites

    graphdef, kernels, rest = nnx.split(model, select, ...)
    leaves, treedef = jax.tree.flatten(kernels)
    sizes = np.cumsum([0] + [x.size for x in leaves])

    def loss(x):
        parts = [x[a:b].reshape(leaf.shape) for a, b, leaf in zip(sizes[:-1], sizes[1:], leaves)]
        m = nnx.merge(graphdef, jax.tree.unflatten(treedef, parts), rest)
        return jnp.mean(jnp.stack([sharpness.classification_loss(m, {k: v[i] for k, v in data.items()})
                                   for i in range(len(data["labels"]))]))

    x0 = jnp.concatenate([x.ravel() for x in leaves])
    assert x0.size == len(sites) * H * H
    return np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(x0), np.float64)).max()


@pytest.mark.parametrize("bits", [32, 2])
def test_part_sharpness_matches_dense_hessian(bits):
    model = tiny_bert()
    if bits != 32:
        model, _ = quant.quantize_model(model, quant.make_spec(bits, bits, 8))
    data = stacked_data(num_batches=2, b=3)
    prefix = "bert.encoder.layers.0.attention."
    assert sorted(sharpness.layer_sites(model)) == sorted([prefix + p for p in ("query", "key", "value", "output")] + [
        "bert.encoder.layers.0.ffn.intermediate", "bert.encoder.layers.0.ffn.output"])
    rows = sharpness.part_sharpness(model, data, sites=[prefix + p for p in ("query", "key", "value")],
                                    tol=1e-6, max_iter=1000)
    by_name = {r["group"]: r for r in rows}
    assert sorted(by_name) == ["layer0.qk", "layer0.v"]
    frozen = sharpness.at_quantized_weights(model)
    group, sites = (("layer0.v", [prefix + "value"]) if bits == 32 else
                    ("layer0.qk", [prefix + "query", prefix + "key"]))   # one dense Hessian each (time)
    r = by_name[group]
    assert r["converged"] and r["params"] == len(sites) * H * H
    np.testing.assert_allclose(r["top"], dense_top(frozen, data, sites), rtol=2e-3)


def test_at_quantized_weights_keeps_the_function():
    qmodel, _ = quant.quantize_model(tiny_bert(), quant.make_spec(1, 1, 8))
    b = {k: v[0] for k, v in stacked_data().items()}
    frozen = sharpness.at_quantized_weights(qmodel)
    out = [np.asarray(m(b["input_ids"], b["attention_mask"]).logits) for m in (qmodel, frozen)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    kernel = frozen.bert.encoder.layers[0].attention.value.kernel[...]
    assert len(np.unique(np.abs(np.asarray(kernel)))) == 1          # binary: +-alpha only


def test_plot_sharpness(tmp_path):
    rows = [dict(group=f"layer{i}.{p}", part=p, layer=i, top=float(i + 1)) for i in range(2) for p in ("qk", "v")]
    path = sharpness.plot_sharpness({"fp32": rows, "binary": rows}, str(tmp_path / "s.png"))
    assert os.path.getsize(path) > 1000
    parts = [dict(group=p, part=p, layer=None, top=-0.5 + i) for i, p in enumerate(("qk", "v"))]
    path = sharpness.plot_sharpness({"fp32": parts, "binary": parts}, str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 1000
