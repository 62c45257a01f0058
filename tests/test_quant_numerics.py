"""Quantizer numerics: activation ranges never coupled across a batch (per token / per example),
padding never entering a range, float32 quantizer arithmetic under bfloat16, learned quantizer
state positive by construction, and the integer model equal to fake quantization."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efficient_nlp import quant
from efficient_nlp.models import family as F
from efficient_nlp.quant import quantizers as Q

import _tiny  # tests/_tiny.py

V, T, PAD = 40, 6, 10  # vocabulary, the row's length, the padded batches' length


def _ids(rows, length, seed):
    return np.random.default_rng(seed).integers(1, V, (rows, length)).astype(np.int32)


def bert_batches():
    """``(alone, a, b)``: one row of T tokens, and two batches of 3 rows of PAD tokens holding it
    at index 1 (masked after T), with different other rows and different ids under the mask."""
    row = _ids(1, T, seed=0)
    alone = {"input_ids": row, "attention_mask": np.ones_like(row), "token_type_ids": np.zeros_like(row)}
    out = [alone]
    for seed in (1, 2):
        ids = _ids(3, PAD, seed)
        ids[1, :T] = row[0]
        mask = np.ones_like(ids)
        mask[1, T:] = 0
        mask[2, 3 + seed:] = 0  # another padded row
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
    return out


@pytest.fixture(scope="module")
def bert():
    return _tiny.tiny_bert(vocab=V, hidden=16, layers=2, heads=2, intermediate=24, positions=16)


def quantized(model, *bits, **kw):
    qmodel, _ = quant.quantize_model(model, quant.make_spec(*bits, **kw))
    if kw.get("activation_method", "uniform") != "uniform":
        quant.calibrate(qmodel, {"input_ids": _ids(4, PAD, 7)})
    return qmodel


@pytest.fixture(scope="module")
def variants(bert):
    """Fake-quantized W8A8 models with dynamic per-token (uniform) and static (LSQ) activation
    ranges, and their integer models."""
    out = {}
    for method in ("uniform", "lsq"):
        qmodel = quantized(bert, 8, 8, 8, activation_method=method)
        out[method] = qmodel
        out[method + " integer"] = quant.to_integer_model(qmodel)[0]
    return out


@pytest.mark.parametrize("kind", ["uniform", "uniform integer", "lsq", "lsq integer"])
def test_a_row_never_depends_on_its_batch_or_its_padding(variants, kind):
    """Exact at a fixed shape: other rows and the ids under the mask change nothing, bit for bit.
    Against the row run alone (another shape) the tolerance is float32 rounding: XLA compiles a
    [1, 6] and a [3, 10] batch into differently fused programs whose float results differ in the
    last bits (the float model itself differs by ~2e-8 here); a range over the batch gave ~1e-3."""
    model = variants[kind]
    alone, a, b = bert_batches()
    in_a, in_b = np.asarray(_tiny.logits(model, a))[1], np.asarray(_tiny.logits(model, b))[1]
    np.testing.assert_array_equal(in_a, in_b)
    np.testing.assert_allclose(np.asarray(_tiny.logits(model, alone))[0], in_a, rtol=0, atol=1e-6)


def test_per_example_ranges_are_independent_of_the_other_rows(bert):
    """``example``: one range per batch row (its own padding included), never the batch's."""
    qmodel = quantized(bert, 8, 8, 8, activation_granularity="example")
    _, a, _ = bert_batches()
    b = {k: v.copy() for k, v in a.items()}
    b["input_ids"][[0, 2]] = _ids(2, PAD, 11)
    for model in (qmodel, quant.to_integer_model(qmodel)[0]):
        np.testing.assert_array_equal(np.asarray(_tiny.logits(model, a))[1], np.asarray(_tiny.logits(model, b))[1])


def test_decoder_attention_stays_causal_and_batch_independent():
    """Per-token v scales are folded into the probabilities (a key scales only its own column):
    changing future tokens or the other rows leaves every earlier position's logits exactly equal,
    in fake quantization and in the integer model."""
    model = _tiny.tiny_decoder("llama", vocab=V, layers=1)
    qmodel = quantized(model, 8, 8, 8)
    imodel = quant.to_integer_model(qmodel)[0]
    ids = _ids(3, PAD, 3)
    other = ids.copy()
    other[1, T:] = _ids(1, PAD - T, 4)[0]     # row 1's future
    other[[0, 2]] = _ids(2, PAD, 5)           # the other rows
    for m in (qmodel, imodel):
        x = np.asarray(_tiny.logits(m, {"input_ids": ids}))[1, :T]
        y = np.asarray(_tiny.logits(m, {"input_ids": other}))[1, :T]
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bits,kw,tol", [((8, 8, 8), {}, 1e-5), ((4, 4, 4), {}, 1e-3),
                                         ((8, 8, 8), {"activation_granularity": "example"}, 1e-5)],
                         ids=["W8A8-token", "W4A4-token", "W8A8-example"])
def test_integer_model_equals_fake_quant(bert, bits, kw, tol):
    """Same codes, exact int32 sums instead of float ones: equal up to float rounding (at 4 bits a
    code of a later layer may round the other way where the two sums differ in the last bit)."""
    qmodel = quantized(bert, *bits, **kw)
    imodel, report = quant.to_integer_model(qmodel)
    assert len(report.integer_sites) == 2 * 7 + 1  # 6 Linears and q.k / probs.v per layer, the word embedding
    _, a, _ = bert_batches()
    fake, integer = np.asarray(_tiny.logits(qmodel, a)), np.asarray(_tiny.logits(imodel, a))
    np.testing.assert_allclose(integer, fake, rtol=0, atol=tol * np.abs(fake).max())
    np.testing.assert_array_equal(integer.argmax(-1), fake.argmax(-1))


def _module(method, signed, granularity="token", range_mode=None):
    qm = quant.QuantizerModule(quant.Quantizer(method, 8, signed, granularity), range_mode=range_mode)
    if method in ("lsq", "pact"):
        qm.observe(np.random.default_rng(2).normal(size=(64,)).astype(np.float32) + (0 if signed else 1.5))
    return qm


MODULES = [("uniform", True, "token", None), ("uniform", False, "token", None), ("uniform", False, "token", "nonneg"),
           ("uniform", True, "example", None), ("lsq", True, "token", None), ("lsq", False, "token", None),
           ("pact", True, "token", None), ("pact", False, "token", None)]


@pytest.mark.parametrize("args", MODULES, ids=lambda a: "-".join(str(x) for x in a if x is not None))
def test_bfloat16_inputs_get_the_codes_of_their_float32_values(args):
    """Ranges, scales and codes are float32 whatever the input dtype: a bfloat16 tensor gets exactly
    the codes (and scales) of the same values in float32, and the fake-quantized output is the
    float32 one rounded to bfloat16 -- so the int8 export agrees with a bfloat16 QAT forward."""
    qm = _module(*args)
    x16 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 24)) * 3 + (0 if args[1] else 2), jnp.bfloat16)
    x32 = x16.astype(jnp.float32)
    got, want = quant.activation_codes(qm, x16), quant.activation_codes(qm, x32)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    y16 = qm(x16)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16), np.asarray(qm(x32).astype(jnp.bfloat16)))


def test_int8_linear_agrees_with_bfloat16_fake_quant_up_to_bfloat16_rounding():
    lin = nnx.Linear(32, 16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 32)), jnp.bfloat16)
    for method in ("uniform", "lsq"):
        q = quant.QuantLinear(lin, "lin", quant.Quantizer("uniform", 8, granularity="channel"),
                              quant.Quantizer(method, 8, True, "token"))
        q.input_quant.observe(x)
        fake, integer = q(x), quant.IntLinear(q)(x)
        assert fake.dtype == jnp.bfloat16
        # The int8 model sees the same codes (float32 in both), so the only difference is bfloat16's
        # rounding of the dequantized operands and of the output (8-bit mantissa: 2^-8 relative).
        np.testing.assert_array_equal(np.asarray(quant.IntLinear(q)(x.astype(jnp.float32))), np.asarray(integer))
        err = np.abs(np.asarray(fake, np.float32) - np.asarray(integer))
        assert err.max() <= 2 ** -6 * np.abs(np.asarray(integer)).max(), method


def test_learned_state_is_positive_by_construction():
    """A step pushed negative quantizes like its magnitude; a zero step stays finite; swapped PACT
    clip values give the ordered grid -- in fake quantization, the integer codes and the export."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 24)), jnp.float32)
    np.testing.assert_array_equal(Q.lsq(x, -0.05, 4), Q.lsq(x, 0.05, 4))
    np.testing.assert_array_equal(Q.lsq_plus(x, -0.05, -1.0, 4), Q.lsq_plus(x, 0.05, -1.0, 4))
    np.testing.assert_array_equal(Q.clip_quant(x, 1.0, -1.5, 4, signed=False),
                                  Q.clip_quant(x, -1.5, 1.0, 4, signed=False))
    assert np.all(np.isfinite(np.asarray(Q.lsq(x, 0.0, 4))))
    g_neg = jax.grad(lambda s: jnp.sum(Q.lsq(x, s, 4) * x))(-0.05)
    g_pos = jax.grad(lambda s: jnp.sum(Q.lsq(x, s, 4) * x))(0.05)
    np.testing.assert_allclose(g_neg, -g_pos)

    for method, signed in (("lsq", True), ("lsq", False), ("pact", False)):
        qm = _module(method, signed)
        want = np.asarray(qm(x))
        if method == "lsq":
            qm.step[...] = -qm.step[...]
        else:
            qm.lo[...], qm.hi[...] = qm.hi[...], qm.lo[...]
        np.testing.assert_array_equal(np.asarray(qm(x)), want)
        codes, s, offset, shift = quant.activation_codes(qm, x)
        back = s * (codes.astype(jnp.float32) + shift) + (0 if offset is None else offset)
        np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-6)

    lin = nnx.Linear(24, 8, rngs=nnx.Rngs(0))
    q = quant.QuantLinear(lin, "lin", quant.Quantizer("lsq", 4, granularity="channel"), None)
    want = np.asarray(q.weight_quant(lin.kernel[...]))
    q.weight_quant.step[...] = -q.weight_quant.step[...]
    np.testing.assert_array_equal(np.asarray(q.weight_quant(lin.kernel[...])), want)
    exported = quant.weight_codes(q.weight_quant, lin.kernel[...])
    np.testing.assert_array_equal(np.asarray(quant.dequantize_weight(q.weight_quant.quantizer, **exported)), want)


def test_granularities_are_validated(bert):
    spec = quant.make_spec(8, 8, 8)
    assert spec.activation.granularity == "token" and spec.weight.granularity == "channel"
    assert quant.spec_from_config({"activation_granularity": "example"}).activation.name == "uniform8/ex"
    with pytest.raises(ValueError, match="activation_granularity must be one of.*'batch'"):
        quant.make_spec(8, 8, 8, activation_granularity="batch")
    with pytest.raises(ValueError, match=r"query\.input.*'channel'; activations take"):
        quant.quantize_model(bert, quant.make_spec(8, 8, 8, rules=[(r"0\.attention\.query\.input$",
                                                                     {"granularity": "channel"})]))
    with pytest.raises(ValueError, match=r"query' .*'token'; weights and embeddings take"):
        quant.quantize_model(bert, quant.make_spec(8, 8, 8, rules=[(r"0\.attention\.query$",
                                                                     {"granularity": "token"})]))
    # 'tensor' on an activation site is one range per example, never one over the batch.
    tensor = quant.Quantizer("uniform", 8, True, "tensor")
    _, report = quant.quantize_model(bert, quant.QuantSpec(activation=tensor, activation_unsigned=tensor))
    assert {q for site, q, _ in report.rows if site.endswith(".input") and "classifier" not in site} == {"uniform8/ex"}
    assert Q.activation_axis("token", 4) == (3,) and Q.activation_axis("example", 3) == (1, 2)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs several (simulated) devices")
def test_data_parallel_forward_needs_no_collective(bert):
    """With the batch sharded and the parameters replicated, a quantized forward communicates
    nothing: no activation range spans devices."""
    n = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    qmodel = quantized(bert, 8, 8, 8)
    graphdef, state = nnx.split(qmodel)
    ids = jax.device_put(_ids(2 * n, PAD, 9), NamedSharding(mesh, P("data")))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    fwd = jax.jit(lambda s, i: F.forward(nnx.merge(graphdef, s), {"input_ids": i}).logits)
    hlo = fwd.lower(state, ids).compile().as_text()
    assert "all-reduce" not in hlo and "all-gather" not in hlo
