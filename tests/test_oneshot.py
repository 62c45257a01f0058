"""The one-shot pass (`efficient_nlp.oneshot`) on tiny encoders and decoders: RTN equals the
per-channel fake quantizer, GPTQ beats RTN layer by layer and end to end on the calibration data,
smoothing leaves the float function unchanged where it folds, pruning meets the exact pattern,
the results export and run on the integer path, and the pass keeps one layer boundary of
hidden states, never a whole model's activations."""
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_nlp import oneshot, quant
from efficient_nlp.models import family as F

from _tiny import lm_batch, tiny_bert, tiny_decoder  # tests/_tiny.py
from _tiny import logits as jit_logits

V, T = 61, 12


def calib(n=24, seed=0):
    return lm_batch(n, T, V, seed)


def logits(model, b):
    return np.asarray(jit_logits(model, {k: jnp.asarray(v) for k, v in b.items()}))


def lsq_spec(bits=4, a_bits=32, group_size=0):
    kw = dict(weight_granularity="group", weight_group_size=group_size) if group_size else {}
    return quant.make_spec(bits, 32, a_bits, weight_method="lsq", **kw)


def models_():
    return {"bert": tiny_bert(0, vocab=V, hidden=16, intermediate=32), "llama": tiny_decoder("llama", vocab=V),
            "gpt2": tiny_decoder("gpt2", vocab=V)}


@pytest.mark.parametrize("kind", ["llama"])
def test_rtn_equals_the_per_channel_fake_quantizer(kind):
    model, b = models_()[kind], calib()
    rtn = oneshot.quantize(quant.quantize_model(model, lsq_spec(3))[0], b, method="rtn", log=None).model
    ref, _ = quant.quantize_model(model, quant.make_spec(3, 32, 32))   # uniform abs-max per channel
    np.testing.assert_allclose(logits(rtn, b), logits(ref, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_gptq_beats_rtn_per_layer_and_end_to_end_on_the_calibration_set(kind):
    model, b = models_()[kind], calib(48)
    q = quant.quantize_model(model, lsq_spec(3))[0]
    gptq = oneshot.quantize(q, b, method="gptq", log=None)
    rtn = oneshot.quantize(q, b, method="rtn", log=None)
    sites = {r["site"] for r in gptq.report}
    assert {s.path for s in F.sites(model)} <= sites           # every layer Linear was visited
    assert all(r["error"] <= r["rtn_error"] * (1 + 1e-4) for r in gptq.report)
    fp = logits(model, b)
    err = {name: np.mean((logits(r.model, b) - fp) ** 2) for name, r in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"]


def test_the_pass_holds_one_layer_boundary_of_hidden_states():
    model, b = tiny_decoder("llama", vocab=V, intermediate=48), calib(20)
    result = oneshot.quantize(quant.quantize_model(model, lsq_spec(4))[0], b, method="gptq", log=None)
    held = result.info["held"]
    assert held["hidden"] == (20, T, 16)                       # [N, T, H]: one layer boundary
    assert set(held["stats"]) == {(16, 16), (48, 48)}          # one [d_in, d_in] Gram matrix per site group
    assert len(held["stats"]) == 2 * 4 + 1                     # q/k/v, o, ffn_in/gate, ffn_out per layer; untied head


def test_group_scales_land_in_the_lsq_steps_and_export_exactly():
    model, b = tiny_decoder("llama", vocab=V, intermediate=32), calib()
    q = oneshot.quantize(quant.quantize_model(model, lsq_spec(4, group_size=8))[0], b, method="gptq", log=None).model
    site = F.site_path(q, 0, "ffn_out")
    assert F.get_module(q, site).weight_quant.step[...].shape == (32 // 8, 1, 16)
    restored = quant.restore(quant.export_packed(q), quant.quantize_model(model, lsq_spec(4, group_size=8))[0])
    np.testing.assert_array_equal(logits(restored, b), logits(q, b))


@pytest.mark.parametrize("kind,smoothed_roles", [("llama", {"q", "k", "v", "ffn_in", "ffn_gate", "ffn_out"}),
                                                 ("gpt2", {"q", "k", "v", "o", "ffn_in"}),
                                                 ("bert", {"o"})])
@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_smoothing_keeps_the_float_function_and_folds_where_it_can(kind, smoothed_roles, method):
    model, b = models_()[kind], calib()
    result = oneshot.smooth(model, b, method=method, bits=3, log=None)
    np.testing.assert_allclose(logits(result.model, b), logits(model, b), rtol=2e-4, atol=2e-4)
    assert {r["role"] for r in result.report if r["smoothed"]} == smoothed_roles
    changed = [r["site"] for r in result.report if r["smoothed"]]
    a = np.asarray(F.get_module(model, changed[0]).kernel[...])
    assert not np.allclose(np.asarray(F.get_module(result.model, changed[0]).kernel[...]), a)


@pytest.mark.slow
def test_smoothquant_flattens_an_outlier_channel_before_w8a8():
    model, b = tiny_decoder("llama", vocab=V), calib()
    norm = F.get_module(model, f"{F.layer_path(model, 0)}.attention.norm")
    norm.scale[...] = norm.scale[...].at[3].set(40.0)          # one outlier input channel of q/k/v
    result = oneshot.smooth(model, b, method="smoothquant", log=None)
    row = next(r for r in result.report if r["layer"] == 0 and r["role"] == "q")
    assert row["max_input_after"] < row["max_input"] / 3
    w8a8 = quant.make_spec(8, 32, 8, weight_method="lsq", activation_method="pact")
    errs = []
    for float_model in (model, result.model):
        q = quant.quantize_model(float_model, w8a8)[0]
        quant.calibrate(q, b)
        out = oneshot.quantize(q, b, method="rtn", log=None).model
        errs.append(np.mean((logits(out, b) - logits(model, b)) ** 2))
    assert errs[1] < errs[0]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_pruning_meets_2_4_in_every_layer_linear(method):
    model, b = tiny_decoder("llama", vocab=V, intermediate=32), calib()
    out = oneshot.prune(model, b, method=method, sparsity=0.5, n_m=(2, 4), log=None).model
    for site in F.sites(out):
        w = np.asarray(F.get_module(out, site.path).kernel[...])
        zeros = (w == 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(axis=1)
        assert (zeros == 2).all(), site.path
    assert F.get_module(out, "lm_head").kernel[...].all()      # the head stays dense


def test_sparsegpt_beats_magnitude_and_prunes_and_quantizes_in_one_pass():
    model, b = tiny_bert(1, vocab=V, hidden=16, intermediate=32), calib(48)
    rows = {m: oneshot.prune(model, b, method=m, sparsity=0.5, log=None).report for m in ("sparsegpt", "magnitude")}
    assert np.mean([r["error"] for r in rows["sparsegpt"]]) < np.mean([r["error"] for r in rows["magnitude"]])
    q = quant.quantize_model(model, lsq_spec(4))[0]
    both = oneshot.prune(q, b, method="sparsegpt", sparsity=0.5, n_m=(2, 4), log=None).model
    lin = F.get_module(both, F.site_path(both, 0, "ffn_in"))
    w, step = np.asarray(lin.kernel[...]), np.asarray(lin.weight_quant.step[...])
    codes = w / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)        # on the 4-bit grid
    assert ((w == 0).reshape(4, 4, -1).sum(axis=1) >= 2).all()


def test_results_run_on_the_integer_path():
    model, b = tiny_bert(2, vocab=V, hidden=16, intermediate=32), calib()
    q = quant.quantize_model(model, quant.make_spec(4, 32, 8, weight_method="lsq", activation_method="pact"))[0]
    quant.calibrate(q, b)
    out = oneshot.quantize(q, b, method="gptq", log=None).model
    integer, _ = quant.to_integer_model(out)
    np.testing.assert_allclose(logits(integer, b), logits(out, b), rtol=1e-4, atol=1e-4)


def test_clear_errors():
    model, b = tiny_bert(0, vocab=V, hidden=16, intermediate=32), calib()
    with pytest.raises(ValueError, match="weight_method='lsq'"):
        oneshot.quantize(quant.quantize_model(model, quant.make_spec(4, 32, 32))[0], b, log=None)
    with pytest.raises(ValueError, match="valid"):
        oneshot.quantize(quant.quantize_model(model, lsq_spec(4))[0], b, method="gptqq", log=None)
    with pytest.raises(ValueError, match="float model"):
        oneshot.smooth(quant.quantize_model(model, lsq_spec(4))[0], b, log=None)
    with pytest.raises(ValueError, match="at least 32 tokens"):    # ffn_out reads 32 features
        oneshot.quantize(quant.quantize_model(model, lsq_spec(4))[0], {k: v[:2] for k, v in b.items()}, log=None)
    with pytest.raises(ValueError, match="empty"):
        oneshot.prune(model, {k: v[:0] for k, v in b.items()}, log=None)


def test_reconstruction_after_gptq_keeps_its_scales_and_trains_the_latent_weights():
    from efficient_nlp.quant import mrem
    model, b = tiny_decoder("llama", vocab=V, layers=1), calib(16)
    q = oneshot.quantize(quant.quantize_model(model, lsq_spec(3))[0], b, method="gptq", log=None).model
    site = F.site_path(q, 0, "ffn_in")
    out = mrem.mrem_s(q, model, b, num_modules=1, steps=3, batch_size=8, log=None).model
    before, after = F.get_module(q, site), F.get_module(out, site)
    np.testing.assert_array_equal(np.asarray(after.weight_quant.step[...]), np.asarray(before.weight_quant.step[...]))
    assert not np.array_equal(np.asarray(after.kernel[...]), np.asarray(before.kernel[...]))
