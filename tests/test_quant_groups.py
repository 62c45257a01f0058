"""Group-wise weight scales ("g128") and weight-only settings (W4A16): fake quantization against
per-channel quantization of each group, LSQ steps per group, packed export, the integer path
and cost accounting."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import quant
from efficient_nlp.quant import integer, quantizers

import _tiny  # tests/_tiny.py
from _tiny import logits

H, L, N, I, C, T, V = 64, 1, 2, 128, 3, 8, 64
G = 32  # group size: 2 groups per kernel of d_in = H, 4 for the FFN output (d_in = I)


def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, vocab=V, hidden=H, layers=L, heads=N, intermediate=I, labels=C)


def batch(b=4):
    return _tiny.token_batch(b, T, V)


@pytest.fixture(scope="module")
def float_model():
    return tiny_bert()


def rand(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def slices(x, g):
    return [x[i:i + g] for i in range(0, x.shape[0], g)]


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("bits,signed", [(4, True), (8, True), (3, False)])
def test_group_uniform_is_per_channel_uniform_of_each_group(bits, signed):
    x, g = rand((24, 5), seed=bits), 6
    got = quant.uniform(x, bits, signed, group_size=g)
    want = jnp.concatenate([quant.uniform(s, bits, signed, axis=0) for s in slices(x, g)])
    np.testing.assert_array_equal(got, want)
    scale, zp = quant.uniform_params(x, bits, signed, group_size=g)
    assert scale.shape == zp.shape == (4, 1, 5)
    for i, s in enumerate(slices(x, g)):
        s_ref, zp_ref = quant.uniform_params(s, bits, signed, axis=0)
        np.testing.assert_array_equal(scale[i], s_ref)
        np.testing.assert_array_equal(zp[i], zp_ref)
    # The integer codes keep the tensor's shape and dequantize to the fake-quant values exactly.
    codes = quant.quantize_codes(x, scale, zp, bits, signed)
    assert codes.shape == x.shape and codes.dtype == jnp.int8
    np.testing.assert_array_equal(quant.dequantize(codes, scale, zp), got)
    np.testing.assert_array_equal(quantizers.ungroup(quantizers.group_view(x, g)), x)
    np.testing.assert_array_equal(quantizers.group_view(x, g)[1], x[g:2 * g])


def test_group_size_d_in_is_per_channel_exactly():
    x = rand((16, 7), seed=1)
    np.testing.assert_array_equal(quant.uniform(x, 4, group_size=16), quant.uniform(x, 4, axis=0))
    np.testing.assert_array_equal(quant.lsq_init(x, 4, group_size=16)[0], quant.lsq_init(x, 4, axis=0))
    lin = nnx.Linear(16, 7, rngs=nnx.Rngs(0))
    inp = rand((3, 16), seed=2)
    for method in ("uniform", "lsq"):
        grp = quant.QuantLinear(lin, "lin", quant.Quantizer(method, 4, granularity="group", group_size=16), None)
        ch = quant.QuantLinear(lin, "lin", quant.Quantizer(method, 4, granularity="channel"), None)
        np.testing.assert_array_equal(grp(inp), ch(inp), err_msg=method)


def test_lsq_group_steps_start_per_group_and_train_per_group():
    """QuantLinear's LSQ step per group is lsq_init of that group's rows; the forward and the
    step gradient equal per-channel LSQ on each slice (numel = g in the gradient scale)."""
    lin = nnx.Linear(24, 5, rngs=nnx.Rngs(3))
    w, g, bits = lin.kernel[...], 8, 4
    q = quant.QuantLinear(lin, "lin", quant.Quantizer("lsq", bits, granularity="group", group_size=g), None)
    step = q.weight_quant.step[...]
    assert step.shape == (3, 1, 5)
    qp = 2 ** (bits - 1) - 1
    for i, s in enumerate(slices(w, g)):
        np.testing.assert_allclose(step[i], 2 * np.mean(np.abs(s), axis=0, keepdims=True) / math.sqrt(qp),
                                   rtol=1e-6)
    np.testing.assert_array_equal(step, quant.lsq_init(w, bits, group_size=g))

    up = rand(w.shape, seed=4)
    f_grp = lambda w, s: jnp.sum(up * quant.lsq(w, s, bits))  # noqa: E731
    gw, gs = jax.grad(f_grp, argnums=(0, 1))(w, step)
    np.testing.assert_array_equal(quant.lsq(w, step, bits),
                                  jnp.concatenate([quant.lsq(s, step[i], bits) for i, s in enumerate(slices(w, g))]))
    for i, (s, u) in enumerate(zip(slices(w, g), slices(up, g))):
        ref_w, ref_s = jax.grad(lambda w, s: jnp.sum(u * quant.lsq(w, s, bits)), argnums=(0, 1))(s, step[i])
        np.testing.assert_array_equal(gw[i * g:(i + 1) * g], ref_w)
        np.testing.assert_allclose(gs[i], ref_s, rtol=1e-6)
    assert np.all(np.asarray(gs) != 0)


# ----------------------------------------------------------------------------- specs and errors
def test_specs_names_and_weight_only_settings(float_model):
    spec = quant.make_spec(4, 4, 8, weight_group_size=128)
    assert spec.weight == quant.Quantizer("uniform", 4, granularity="group", group_size=128)
    assert spec.weight.name == "uniform4/g128"
    assert spec.embedding.granularity == "channel"                          # embeddings stay row-wise
    assert quant.spec_from_config({"w_bits": 4, "weight_group_size": 64}).weight.group_size == 64
    assert quant.spec_from_config({"w_bits": 4, "weight_group_size": 0}).weight.granularity == "channel"
    assert quant.Quantizer("uniform", 4, granularity="channel").replace(group_size=32).granularity == "group"
    assert quant.Quantizer("uniform", 4, granularity="group", group_size=32).replace(
        granularity="channel").group_size == 0
    for a_bits in (16, 32, None):
        s = quant.make_spec(4, a_bits=a_bits)
        assert s.activation is None and s.activation_unsigned is None
    _, report = quant.quantize_model(float_model, quant.make_spec(4, 32, 16, weight_group_size=G))
    quantized = set(report.quantized)
    assert quantized and all(not site.endswith((".input", ".q", ".k", ".v", ".probs")) for site in quantized)
    assert all(q == f"uniform4/g{G}" for site, q, _ in report.rows if site in quantized)
    with pytest.raises(ValueError, match="a_bits=12"):
        quant.make_spec(4, a_bits=12)


def test_group_errors_name_the_problem(float_model):
    with pytest.raises(ValueError, match="needs group_size"):
        quant.Quantizer("uniform", 4, granularity="group")
    with pytest.raises(ValueError, match="needs granularity='group'"):
        quant.Quantizer("uniform", 4, granularity="channel", group_size=128)
    with pytest.raises(ValueError, match="twn.*no group-wise scales"):
        quant.Quantizer("twn", 2, granularity="group", group_size=8)
    with pytest.raises(ValueError, match=r"group size 24 does not divide d_in=64.*\[1, 2, 4, 8, 16, 32, 64\]"):
        quant.quantize_model(float_model, quant.make_spec(4, 4, 8, weight_group_size=24))
    with pytest.raises(ValueError, match=r"d_in=10.*\[1, 2, 5, 10\]"):
        quantizers.group_view(jnp.ones((10, 3)), 4)
    rule = [(r"word_embeddings$", {"granularity": "group", "group_size": 8})]
    with pytest.raises(ValueError, match="word_embeddings.*Linear kernels"):
        quant.quantize_model(float_model, quant.make_spec(4, 4, 8, rules=rule))
    with pytest.raises(ValueError, match="Linear kernels"):
        quant.QuantEmbed(nnx.Embed(8, 4, rngs=nnx.Rngs(0)), "emb",
                         quant.Quantizer("uniform", 4, granularity="group", group_size=2))
    with pytest.raises(ValueError, match="query.input.*Linear kernels"):
        quant.quantize_model(float_model, quant.make_spec(4, 4, 8, rules=[(r"0\.attention\.query\.input$",
                                                                           {"group_size": 8})]))


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("method", ["uniform", "lsq"])
def test_packed_export_round_trip_is_exact(float_model, method, tmp_path):
    spec = quant.make_spec(4, 4, 8, weight_method=method, weight_group_size=G)
    qmodel, _ = quant.quantize_model(float_model, spec)
    artifact = quant.export_packed(qmodel)
    quant.save_packed(artifact, tmp_path)
    loaded = quant.load_packed(tmp_path)
    assert loaded["manifest"] == json.loads(json.dumps(artifact["manifest"]))
    key = "bert.encoder.layers.0.ffn.output.kernel"
    entry = loaded["manifest"]["weights"][key]
    assert (entry["granularity"], entry["group_size"], entry["axis"], entry["pack_bits"]) == ("group", G, 0, 4)
    assert loaded["tensors"][entry["tensors"]["scale"]].shape == (I // G, 1, H)
    assert loaded["tensors"][entry["tensors"]["codes"]].nbytes == I * H // 2
    emb = loaded["manifest"]["weights"]["bert.embeddings.word_embeddings.embedding"]
    assert emb["granularity"] == "channel" and "group_size" not in emb
    values = quant.unpacked_weights(loaded)
    for path, mod, attr in quant.quantized_weights(qmodel):
        np.testing.assert_array_equal(values[f"{path}.{attr}"], mod.weight_quant(getattr(mod, attr)[...]))
    b = batch()
    restored = quant.restore(loaded, quant.quantize_model(tiny_bert(seed=7), spec)[0])
    np.testing.assert_allclose(logits(restored, b), logits(qmodel, b), rtol=1e-6, atol=1e-7)
    with pytest.raises(quant.PackedArtifactError, match="exported spec"):
        quant.restore(loaded, quant.quantize_model(float_model, quant.make_spec(4, 4, 8, weight_method=method))[0])


# ----------------------------------------------------------------------------- integer path
@pytest.mark.parametrize("setting", ["W4A8", "W4A8-lsq", "W4A16"])
def test_integer_model_equals_fake_quant(float_model, setting):
    a_bits = 16 if setting == "W4A16" else 8
    method = "lsq" if setting.endswith("lsq") else "uniform"
    qmodel, _ = quant.quantize_model(float_model, quant.make_spec(4, 4, a_bits, weight_method=method,
                                                                  activation_method=method, weight_group_size=G))
    b = batch(8)
    if method == "lsq":
        quant.calibrate(qmodel, b)
    imodel, report = quant.to_integer_model(qmodel)
    ffn_out = imodel.bert.encoder.layers[0].ffn.output
    fake, integer = np.asarray(logits(qmodel, b)), np.asarray(logits(imodel, b))
    if a_bits == 8:
        assert len(report.integer_sites) == L * 7 + 1          # the 6 + pooler Linears, the attention
        assert isinstance(ffn_out, quant.IntLinear)
        assert ffn_out.w_codes[...].shape == (I // G, G, H) and ffn_out.w_codes[...].dtype == jnp.int8
        jaxpr = str(jax.make_jaxpr(lambda x: ffn_out(x))(np.ones((2, T, I), np.float32)))
        assert "i8" in jaxpr and "preferred_element_type=int32" in jaxpr
        np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5 * np.abs(fake).max())
        np.testing.assert_array_equal(integer.argmax(-1), fake.argmax(-1))
    else:
        assert report.integer_sites == []
        assert isinstance(ffn_out, quant.DequantLinear) and ffn_out.scale[...].shape == (I // G, 1, H)
        w = quant.dequantize_weight(ffn_out.quantizer, ffn_out.codes[...], ffn_out.scale[...])
        fq = qmodel.bert.encoder.layers[0].ffn.output
        np.testing.assert_array_equal(w, fq.weight_quant(fq.kernel[...]))
        np.testing.assert_allclose(integer, fake, rtol=1e-6, atol=1e-7)


def test_group_int8_matmul_is_the_per_group_product():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(2, 3, 4, 8)).astype(np.int8)    # [..., G, g]
    w = rng.integers(-8, 8, size=(4, 8, 5)).astype(np.int8)           # [G, g, N]
    got = np.asarray(integer.group_int8_matmul(jnp.asarray(x), jnp.asarray(w)))
    want = np.einsum("abgk,gkn->abgn", x.astype(np.int64), w.astype(np.int64))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- cost
def test_group_scales_cost_exactly_their_extra_floats(float_model):
    one = {k: v[:1] for k, v in batch().items()}
    specs = {g: quant.make_spec(4, 4, 8, weight_group_size=g) for g in (0, G)}
    nbytes = {g: quant.artifact_nbytes(quant.export_packed(quant.quantize_model(float_model, s)[0]))
              for g, s in specs.items()}
    cost = {g: quant.cost_report(float_model, s, one) for g, s in specs.items()}
    # Per layer: query, key, value, attention output, FFN intermediate (d_in = H), FFN output
    # (d_in = I); plus the pooler.  Each has d_in / g scales per output column instead of one.
    kernels = [(H, H)] * 4 + [(H, I), (I, H)]
    kernels = kernels * L + [(H, H)]
    extra = 4 * sum((d_in // G - 1) * d_out for d_in, d_out in kernels)
    assert nbytes[G] - nbytes[0] == extra
    assert round((cost[G].size_mb - cost[0].size_mb) * 2**20) == extra
    assert nbytes[G] == round(cost[G].size_mb * 2**20)               # the report counts the artefact
