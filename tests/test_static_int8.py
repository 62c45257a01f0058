"""Static-scale int8 inference (`quant.to_static_int8`): the same function as the fake-quantized
model with the same static scales, exact integer products on both carriers, clear errors."""
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
from efficient_nlp import quant
from efficient_nlp.quant import static_int8 as S

V = 50


def _logits(model, batch):
    return np.asarray(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits)


@pytest.fixture(scope="module")
def bert():
    return _tiny.tiny_bert(vocab=V, intermediate=40)


@pytest.fixture(scope="module")
def calib():
    return _tiny.token_batch(4, 12, V, seed=1)


@pytest.mark.parametrize("carrier", ["bf16", "int8"])
@pytest.mark.parametrize("method,attention", [("pact", False), ("lsq", True)], ids=["pact", "lsq+attention"])
def test_static_model_equals_fake_quant_with_the_same_scales(bert, calib, carrier, method, attention):
    """Same codes, exact integer sums, rescaling in float32: logits equal up to float rounding and
    argmax equal; q / k / v share one input grid, so each layer has one fused [H, 3H] product."""
    rules = [] if attention else [(r"\.(q|k|v|probs)$", None)]
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8, activation_method=method, rules=rules))
    quant.calibrate(qmodel, calib)
    static = quant.to_static_int8(qmodel, carrier=carrier)
    attn = static.model.bert.encoder.layers[0].attention
    assert isinstance(attn, S.StaticAttention) and attn.qkv.w_codes[...].shape == (16, 48)
    assert attn.qkv.w_codes[...].dtype == S.CARRIERS[carrier]
    batch = _tiny.token_batch(3, 12, V, seed=2)
    fake, fast = _logits(qmodel, batch), np.asarray(static.forward(*(batch[k] for k in
                                                                      ("input_ids", "attention_mask", "token_type_ids"))))
    np.testing.assert_allclose(fast, fake, rtol=0, atol=1e-5 * np.abs(fake).max())
    np.testing.assert_array_equal(fast.argmax(-1), fake.argmax(-1))
    # the un-jitted model is the same function (another fusion of the float rescaling: last bits)
    np.testing.assert_allclose(_logits(static.model, batch), fast, rtol=0, atol=1e-6 * np.abs(fast).max())


def test_float_model_with_a_calibration_batch(bert, calib):
    """A float model: default W8A8 PACT spec, calibrated on the batch; the model is not changed."""
    before = _logits(bert, calib)
    static = quant.to_static_int8(bert, calib)
    qmodel, _ = quant.quantize_model(bert, S.default_spec(bert))
    quant.calibrate(qmodel, calib)
    np.testing.assert_allclose(_logits(static.model, calib), _logits(qmodel, calib), rtol=0,
                               atol=1e-5 * np.abs(before).max())
    np.testing.assert_array_equal(_logits(bert, calib), before)


def test_a_float_model_with_its_own_spec(bert, calib):
    """``spec=`` replaces the default spec (symmetric PACT here): equal to that spec calibrated."""
    spec = S.default_spec(bert, asymmetric=False)
    static = quant.to_static_int8(bert, calib, spec=spec)
    qmodel, _ = quant.quantize_model(bert, spec)
    quant.calibrate(qmodel, calib)
    ref = _logits(qmodel, calib)
    np.testing.assert_allclose(_logits(static.model, calib), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="either spec="):
        quant.to_static_int8(bert, calib, spec=spec, asymmetric=True)


@pytest.mark.parametrize("k", [384, 1032, 1536, 2100])
def test_bf16_carried_product_is_the_exact_int32_product(k):
    """Worst case (every product 128 * 127 of one sign) and random codes: the bfloat16-carried
    product equals the int32 product (as float32) bit for bit, split into exact slices past 1032."""
    rng = np.random.default_rng(k)
    c = rng.integers(-128, 128, (2, 3, k), dtype=np.int32)
    d = rng.integers(-127, 128, (k, 5), dtype=np.int32)
    c[0, 0], d[:, 0] = -128, -127
    exact = np.einsum("abk,kn->abn", c.astype(np.int64), d.astype(np.int64))
    assert exact[0, 0, 0] == 128 * 127 * k
    for dtype in (jnp.bfloat16, jnp.int8):
        got = np.asarray(S.carried_matmul(jnp.asarray(c, dtype), jnp.asarray(d, dtype)))
        np.testing.assert_array_equal(got, exact.astype(np.float32))


def test_dynamic_activation_ranges_are_a_clear_error(bert, calib):
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8))  # uniform: a range per token
    with pytest.raises(ValueError, match="static activation scales.*activation_method='pact'"):
        quant.to_static_int8(qmodel, calib)


def test_uncalibrated_and_missing_calibration_are_clear_errors(bert, calib):
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8, activation_method="pact"))
    with pytest.raises(ValueError, match="not calibrated.*calibration batch"):
        quant.to_static_int8(qmodel)
    with pytest.raises(ValueError, match="needs a calibration batch"):
        quant.to_static_int8(bert)
    static = quant.to_static_int8(qmodel, calib)  # calibrated here, on a copy
    assert not qmodel.bert.encoder.layers[0].ffn.intermediate.input_quant.calibrated
    assert np.isfinite(_logits(static.model, calib)).all()


def test_smoothed_static_model_equals_smoothed_fake_quant(bert, calib):
    """smooth='smoothquant': SmoothQuant folded into the float model (its function unchanged),
    then the same W8A8 PACT model as the fake-quant reference with the same scales."""
    from efficient_nlp import oneshot

    smoothed = oneshot.smooth(bert, calib, method="smoothquant", alpha=0.5, log=None)
    assert any(r["smoothed"] for r in smoothed.report)
    ref = _logits(bert, calib)
    np.testing.assert_allclose(_logits(smoothed.model, calib), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    static = quant.to_static_int8(bert, calib, smooth="smoothquant", alpha=0.5, clip="minmax")
    qmodel, _ = quant.quantize_model(smoothed.model, S.default_spec(bert))
    quant.calibrate(qmodel, calib)
    batch = _tiny.token_batch(3, 12, V, seed=2)
    fake = _logits(qmodel, batch)
    np.testing.assert_allclose(_logits(static.model, batch), fake, rtol=0, atol=1e-5 * np.abs(fake).max())
    # the smoothing changed the model that was quantized: the unsmoothed static model differs
    plain = _logits(quant.to_static_int8(bert, calib, clip="minmax").model, batch)
    assert np.abs(plain - fake).max() > 1e-4 * np.abs(fake).max()


@pytest.mark.parametrize("clip", ["percentile", "mse"])
def test_clipped_ranges_lie_inside_the_data_and_mse_beats_minmax(bert, calib, clip):
    """Every PACT range lies inside [min, max] of its calibration inputs; MSE clipping never
    raises a quantizer's error on those inputs and lowers the total."""
    qmodel, _ = quant.quantize_model(bert, S.default_spec(bert))
    S.calibrate_clipped(qmodel, calib, clip, percentile=99.0)
    inputs = S.calibration_inputs(qmodel, calib)
    assert len(inputs) == 2 * 6 + 2  # query, key, value, output, ffn in / out per layer; pooler, classifier
    total = {"clip": 0.0, "minmax": 0.0}
    for path, x in inputs.items():
        qm = S.F.get_module(qmodel, path)
        lo, hi = float(qm.lo[...]), float(qm.hi[...])
        assert x.min() <= lo <= hi <= x.max(), path
        b, signed = qm.quantizer.bits, qm.quantizer.signed
        err, full = float(S.quant_mse(x, lo, hi, b, signed)), float(S.quant_mse(x, x.min(), x.max(), b, signed))
        if clip == "mse":
            assert err <= full * (1 + 1e-6), path
        total["clip"] += err
        total["minmax"] += full
    if clip == "mse":
        assert total["clip"] < total["minmax"]
    static = quant.to_static_int8(bert, calib, clip=clip, percentile=99.0)  # the same model, converted
    np.testing.assert_allclose(_logits(static.model, calib), _logits(qmodel, calib), rtol=0,
                               atol=1e-5 * np.abs(_logits(bert, calib)).max())


def test_float_inputs_keep_a_role_in_float_and_bad_options_are_clear_errors(bert, calib):
    static = quant.to_static_int8(bert, calib, float_inputs=("ffn_out",))
    layer = static.model.bert.encoder.layers[0]
    assert isinstance(layer.ffn.intermediate, S.StaticLinear)
    assert not isinstance(layer.ffn.output, S.StaticLinear) and layer.ffn.output.input_quant is None
    with pytest.raises(ValueError, match="unknown layer role.*ffn_outt"):
        quant.to_static_int8(bert, calib, float_inputs=("ffn_outt",))
    with pytest.raises(ValueError, match="clip must be one of"):
        quant.to_static_int8(bert, calib, clip="max")
    with pytest.raises(ValueError, match="smooth must be"):
        quant.to_static_int8(bert, calib, smooth="awq")
    qmodel, _ = quant.quantize_model(bert, S.default_spec(bert))
    with pytest.raises(ValueError, match="already quantized.*float model only"):
        quant.to_static_int8(qmodel, calib, smooth="smoothquant")
