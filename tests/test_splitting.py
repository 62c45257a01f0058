"""Ternary weight splitting (docs/binarybert.md): the operator as a property over random matrices, the
split model's equivalence, its cost accounting and its packed export."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from efficient_nlp import quant
from efficient_nlp.quant import splitting

import _tiny  # tests/_tiny.py

H, L, N, I, C, T, V = 16, 1, 2, 32, 3, 8, 64


# ----------------------------------------------------------------------------- the operator
@functools.partial(jax.jit, static_argnums=1)
def _split_and_check(w, axis):
    w1, w2 = quant.ternary_weight_split(w, axis)
    a, b = quant.tws_scalars(w, axis)
    t, alpha = quant.twn(w, axis)
    codes, _ = quant.ternary_codes(w, axis)
    zeros = jnp.sum(codes == 0, axis=axis, keepdims=axis is not None)
    return w1, w2, a, b, t, alpha, codes, zeros, quant.bwn(w1, axis)[0] + quant.bwn(w2, axis)[0]


def check_split(w, axis=None):
    """Both conditions of docs/binarybert.md element by element, and the scalars' ranges."""
    w = jnp.asarray(w, jnp.float32)
    w1, w2, a, b, t, alpha, codes, zeros, split = map(np.asarray, _split_and_check(w, axis))
    scale = float(np.max(alpha)) + 1e-30
    np.testing.assert_allclose(w1 + w2, w, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(split, t, rtol=0, atol=2e-5 * scale)
    # The non-zeros keep their sign (and, by the line above, their value to rounding).
    assert np.all(np.sign(split)[codes != 0] == codes[codes != 0])
    assert np.all((a > 0) & (a < 1)) and np.all(b >= 0)
    assert np.all((b > 0) | (zeros == 0) | (alpha == 0))      # b > 0 wherever a zero set exists
    return w1, w2, a, b


# Exact zeros and normal magnitudes: XLA on CPU flushes subnormal floats (|x| < 1.2e-38) to zero,
# so a * w of a smallest-normal w would vanish (see the splitting module docstring).
floats = st.one_of(st.just(0.0), st.floats(2.0**-20, 4.0, width=32), st.floats(-4.0, -(2.0**-20), width=32))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6), elements=floats))
def test_split_is_exact_for_random_matrices_layer_wise(w):
    check_split(w)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6), elements=floats))
def test_split_is_exact_row_wise(w):
    check_split(w, axis=1)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 10, 200]), st.floats(0.01, 0.99), st.floats(1.0, 100.0), st.booleans())
def test_one_signed_zero_set_where_the_published_form_fails(n, frac, big, negative):
    """Many elements just below the threshold, all of one sign, and one large element: the
    sign-based form needs ``a = 1/2 - S_J / (2 S_I)``, which is negative once ``S_J > S_I``."""
    x = 0.7 * big / (n - 0.7 * (n - 1)) * frac         # below Delta = 0.7 * ((n-1) x + big) / n
    w = np.concatenate([np.full(n - 1, x), [big]]).astype(np.float32)
    w = -w if negative else w
    w1, w2, a, b = check_split(w)
    s_i, s_j = big, (n - 1) * x
    if s_j < s_i:   # the published form is valid and used
        assert float(a) == pytest.approx(0.5 - (1 if not negative else -1) * s_j / (2 * s_i), rel=1e-5)


def test_closed_forms_on_a_hand_example():
    """w = [3, -2, 0.5, -0.25, 0]: Delta = 0.805, I = {3, -2}, alpha = 2.5, J = {0.5, -0.25, 0}:
    a = 1/2 + (0.25 - 0.5) / (2 * 5) = 0.475, b = (2.5 - 0.25) / 2 = 1.125."""
    w = np.array([3.0, -2.0, 0.5, -0.25, 0.0], np.float32)
    w1, w2, a, b = check_split(w)
    assert float(a) == pytest.approx(0.475) and float(b) == pytest.approx(1.125)
    np.testing.assert_allclose(w1, [0.475 * 3, -0.475 * 2, 0.5 + 1.125, 1.125, 1.125], rtol=1e-6)
    np.testing.assert_allclose(w2, [0.525 * 3, -0.525 * 2, -1.125, -0.25 - 1.125, -1.125], rtol=1e-6)


@pytest.mark.parametrize("w", [[1.0], [0.0], [0.0, 0.0, 0.0], [2.0, -2.0, 2.0], [5.0, 0.0], [-1e-3]],
                         ids=["one", "zero", "all_zero", "no_zero_set", "exact_zero", "tiny"])
def test_degenerate_groups(w):
    w1, w2, a, b = check_split(w)
    assert float(a) == 0.5 or len(w) == 2


def test_split_is_jittable_and_row_wise_matches_per_row_splits():
    w = jax.random.normal(jax.random.key(0), (7, 12))
    w1, w2 = jax.jit(quant.ternary_weight_split, static_argnums=1)(w, 1)
    for r in range(7):
        r1, r2 = quant.ternary_weight_split(w[r])
        np.testing.assert_allclose(w1[r], r1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(w2[r], r2, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the model
def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, vocab=V, hidden=H, layers=L, heads=N, intermediate=I, labels=C)


def batch(b=4):
    return _tiny.token_batch(b, T, V)


@nnx.jit
def _logits(model, b):
    return model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits


def logits(model, b):
    return np.asarray(_logits(model, b))


@pytest.fixture(scope="module")
def float_model():
    return tiny_bert()


def ternary(model, a_bits=8, method="uniform"):
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 2, a_bits, activation_method=method))
    if method != "uniform":
        quant.calibrate(qmodel, batch())
    return qmodel


@pytest.mark.parametrize("a_bits,method", [(8, "uniform"), (4, "lsq")], ids=["a8", "lsq4"])
def test_split_model_gives_the_ternary_models_outputs(float_model, a_bits, method):
    qmodel = ternary(float_model, a_bits, method)
    before = logits(qmodel, batch())
    split, report = quant.split_model(qmodel)
    np.testing.assert_allclose(logits(split, batch()), before, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logits(qmodel, batch()), before)           # the input is unchanged
    sites = quant.splittable_sites(qmodel)
    assert sorted(report.split) == sorted(sites) and not report.binarized
    assert len(sites) == 6 * L + 2                   # Q K V O, FFN in/out per layer, pooler, word embedding
    assert "bert.embeddings.word_embeddings" in sites and not any("classifier" in s for s in sites)
    # LayerNorm, position embeddings, biases and activation quantizers are shared, not split.
    mods = dict(splitting.split_modules(split))
    q = mods["bert.encoder.layers.0.attention.query"]
    orig = qmodel.bert.encoder.layers[0].attention.query
    np.testing.assert_array_equal(q.bias[...], orig.bias[...])
    assert q.input_quant.quantizer == orig.input_quant.quantizer
    assert mods["bert.embeddings.word_embeddings"].weight_quant1.axis == 1          # row-wise halves
    np.testing.assert_allclose(q.kernel1[...] + q.kernel2[...], orig.kernel[...], rtol=1e-6, atol=1e-7)


def test_split_model_trains_both_halves(float_model):
    split, _ = quant.split_model(ternary(float_model))
    b = batch()

    def loss(m):
        return jnp.sum(m(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits ** 2)

    grads = nnx.grad(loss)(split)
    g = grads.bert.encoder.layers[0].ffn.intermediate
    assert float(jnp.abs(g.kernel1[...]).sum()) > 0 and float(jnp.abs(g.kernel2[...]).sum()) > 0
    # The straight-through estimator gives both halves the gradient of their sum.
    np.testing.assert_allclose(g.kernel1[...], g.kernel2[...], rtol=1e-6)


def test_unselected_ternary_sites_become_binary(float_model):
    qmodel = ternary(float_model)
    sites = quant.splittable_sites(qmodel)
    chosen = [s for s in sites if "ffn" in s]
    split, report = quant.split_model(qmodel, sites=chosen)
    assert sorted(report.split) == sorted(chosen) and sorted(report.binarized) == sorted(set(sites) - set(chosen))
    query = split.bert.encoder.layers[0].attention.query
    assert isinstance(query, quant.QuantLinear) and query.weight_quant.quantizer.method == "bwn"
    np.testing.assert_array_equal(query.weight_quant(query.kernel[...]), quant.bwn(query.kernel[...])[0])
    with pytest.raises(ValueError, match="unknown.*attention.qurey"):
        quant.split_model(qmodel, sites=["bert.encoder.layers.0.attention.qurey"])
    with pytest.raises(ValueError, match="no TWN-quantized weights"):
        quant.split_model(quant.quantize_model(float_model, quant.make_spec(8, 8, 8))[0])


def test_cost_report_counts_both_binary_halves(float_model):
    b = {k: v[:1] for k, v in batch().items()}
    tern = quant.cost_report(float_model, quant.make_spec(2, 2, 8), b)
    split = quant.cost_report(float_model, quant.make_spec(2, 2, 8), b, split=True)
    bwn = quant.cost_report(float_model, quant.make_spec(1, 1, 8), b)
    assert split.spec_bits == "1-1-8"
    # Every split matrix: 2 x numel bits + 2 x 32-bit scales (per row for the word embedding);
    # unsplit TWN would be 2 bits + 1 scale.
    mats = [(H, H)] * 4 * L + [(H, I), (I, H)] * L + [(H, H)]          # attention, FFN, pooler
    extra_params = sum(math.prod(s) for s in mats) + V * H
    assert split.params == tern.params + extra_params
    bits_delta = (sum(2 * (math.prod(s) * 1 + 32) - (math.prod(s) * 2 + 32) for s in mats)
                  + 2 * (V * H + 32 * V) - (V * H * 2 + 32 * V))
    assert split.size_mb * 8 * 2**20 == pytest.approx(tern.size_mb * 8 * 2**20 + bits_delta)
    # BOPs: each half is a 1-bit x 8-bit matmul with the full matrix shape.
    rows = {r["site"]: r for r in split.rows}
    q = rows["bert.encoder.layers.0.attention.query.w1"]
    assert q["w_bits"] == 1 and q["bops"] == pytest.approx(2 * T * H * H * 8 / 64)
    assert rows["bert.encoder.layers.0.attention.query.w2"] == dict(q, site=q["site"][:-1] + "2")
    tern_rows = {r["site"]: r for r in tern.rows}
    assert q["flops"] == tern_rows["bert.encoder.layers.0.attention.query"]["flops"]
    def quantized_linear(report, what):
        return sum(r[what] for r in report.rows if r["kind"] == "linear" and r["w_bits"] < 32)

    assert split.flops == pytest.approx(tern.flops + quantized_linear(tern, "flops"))
    assert split.bops == pytest.approx(bwn.bops + quantized_linear(bwn, "bops"))
    half = quant.cost_report(float_model, quant.make_spec(2, 2, 8), b, split=["bert.pooler.dense"])
    assert half.params == tern.params + H * H and half.bops < split.bops


def test_packed_export_of_a_split_model_round_trips(float_model, tmp_path):
    qmodel = ternary(float_model, 4, "lsq")
    split, _ = quant.split_model(qmodel)
    artifact = quant.export_packed(split)
    quant.save_packed(artifact, tmp_path)
    loaded = quant.load_packed(tmp_path)
    weights = loaded["manifest"]["weights"]
    k1 = "bert.encoder.layers.0.ffn.intermediate.kernel1"
    assert weights[k1]["pack_bits"] == 1 and weights[k1]["site"].endswith(".w1")
    assert loaded["tensors"][weights[k1]["tensors"]["codes"]].nbytes == H * I // 8       # real 1-bit packing
    assert loaded["tensors"][weights["bert.embeddings.word_embeddings.embedding2"]["tensors"]["scale"]].shape == (V, 1)
    cost = quant.cost_report(float_model, quant.make_spec(2, 2, 4, activation_method="lsq"),
                             {k: v[:1] for k, v in batch().items()}, split=True)
    assert quant.artifact_nbytes(artifact) == round(cost.size_mb * 2**20)
    template, _ = quant.split_model(ternary(tiny_bert(seed=7), 4, "lsq"))
    expected = logits(split, batch())
    for frozen in (True, False):
        restored = quant.restore(loaded, template, frozen=frozen)
        np.testing.assert_allclose(logits(restored, batch()), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(quant.PackedArtifactError, match="quantized weights differ"):
        quant.restore(loaded, ternary(tiny_bert(seed=7), 4, "lsq"))


@pytest.mark.parametrize("a_bits,method", [(8, "uniform"), (4, "lsq")], ids=["a8", "lsq4"])
def test_integer_model_of_a_split_model_runs_one_int8_matmul_per_split_linear(float_model, a_bits, method):
    """`to_integer_model` turns every split Linear into one int8 matmul against ``[d1 | d2]`` and the
    split embedding into two binary code tables; logits match the fake-quant split model."""
    qmodel = ternary(float_model, a_bits, method)
    split, _ = quant.split_model(qmodel)
    imodel, report = quant.to_integer_model(split)
    kinds = {site: kind for site, kind, _ in report.rows}
    linear_sites = [s for s in quant.splittable_sites(qmodel) if "embeddings" not in s]
    assert all(kinds[s] == "int8 matmul" for s in linear_sites), report
    assert kinds["bert.embeddings.word_embeddings"] == "int8 table"
    q = [m for p, m in nnx.iter_modules(imodel) if isinstance(m, quant.IntSplitLinear)]
    assert len(q) == len(linear_sites) and q[0].w_codes[...].dtype == np.int8
    assert q[0].w_codes[...].shape[1] == 2 * q[0].out_features and set(np.unique(q[0].w_codes[...])) <= {-1, 1}
    fake, integer = logits(split, batch()), logits(imodel, batch())
    np.testing.assert_allclose(integer, fake, rtol=1e-4, atol=1e-4)
