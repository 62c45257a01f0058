"""Quantization specs, the fake-quant model transform, calibration and cost accounting."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import quant, tree

import _tiny  # tests/_tiny.py

H, L, N, I, C, T = 16, 2, 2, 24, 3, 8


def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, hidden=H, layers=L, heads=N, intermediate=I, labels=C)


def batch(b=2):
    return _tiny.token_batch(b, T, 50)


def fwd(model, b):
    return model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits


def report_dict(report):
    return {site: q for site, q, _ in report.rows}


def test_default_spec_follows_the_literature():
    _, report = quant.quantize_model(tiny_bert(), quant.make_spec(2, 2, 8))
    r = report_dict(report)
    layer = "bert.encoder.layers.0"
    for name in ("query", "key", "value", "output"):
        assert r[f"{layer}.attention.{name}"] == "twn2"
        assert r[f"{layer}.attention.{name}.input"] == "uniform8"
    assert r[f"{layer}.ffn.intermediate"] == "twn2" and r[f"{layer}.ffn.output.input"] == "uniform8u"
    assert r[f"{layer}.attention.probs"] == "uniform8u" and r[f"{layer}.attention.q"] == "uniform8"
    assert r["bert.embeddings.word_embeddings"] == "twn2/ch"
    assert r["bert.pooler.dense"] == "twn2"
    for skipped in ("bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings",
                    "classifier", "classifier.input"):
        assert r[skipped] == "float"
    assert not any("layer_norm" in site for site in r)
    assert quant.make_spec(1, 1, 8).weight.method == "bwn"
    assert quant.make_spec(4, 4, 8).weight == quant.Quantizer("uniform", 4, granularity="channel")
    assert quant.make_spec(4, 4, 8, weight_method="lsq").weight.granularity == "channel"
    assert quant.make_spec(4, 4, 8, weight_granularity="tensor").weight == quant.Quantizer("uniform", 4)
    assert quant.spec_from_config(dict(w_bits=4, weight_granularity="")).weight.granularity == "channel"
    assert quant.make_spec(8, 8, 32).activation is None


def test_rules_override_skip_and_fail_clearly():
    spec = quant.make_spec(2, 2, 8, rules=[(r"attention\.query$", {"bits": 8, "method": "uniform"}),
                                           (r"ffn\.output\.input$", None)])
    _, report = quant.quantize_model(tiny_bert(), spec)
    r = report_dict(report)
    assert r["bert.encoder.layers.1.attention.query"] == "uniform8"
    assert r["bert.encoder.layers.1.attention.key"] == "twn2"
    assert r["bert.encoder.layers.0.ffn.output.input"] == "float"
    with pytest.raises(tree.RuleError, match="matches no leaf"):
        quant.quantize_model(tiny_bert(), quant.make_spec(2, 2, 8, rules=[(r"attention\.qeury$", None)]))
    with pytest.raises(ValueError, match="unknown Quantizer field"):
        quant.make_spec(2, 2, 8, rules=[(r"query$", {"bitz": 4})])
    with pytest.raises(ValueError, match="unknown quantization config key"):
        quant.spec_from_config({"w_bits": 2, "abits": 8})
    with pytest.raises(ValueError, match="bwn"):
        quant.Quantizer("uniform", 1)


def test_fake_quant_model_equals_float_model_with_quantized_weights():
    """W2 (TWN) weights, float activations: identical to the float model whose kernels (and
    word-embedding rows) are replaced by their TWN values; parameters keep their paths."""
    model, b = tiny_bert(), batch()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 2, 32))
    float_params = nnx.state(model, nnx.Param)
    q_params = nnx.state(qmodel, nnx.Param)
    assert set(tree.names(float_params)) == set(tree.names(q_params))   # no new parameters (no LSQ)
    manual = nnx.clone(model)
    for path, mod in nnx.iter_modules(manual):
        name = ".".join(map(str, path))
        if isinstance(mod, nnx.Linear) and name != "classifier":
            mod.kernel[...] = quant.twn(mod.kernel[...])[0]
        if name == "bert.embeddings.word_embeddings":
            mod.embedding[...] = quant.twn(mod.embedding[...], axis=1)[0]
    np.testing.assert_allclose(fwd(qmodel, b), fwd(manual, b), atol=1e-6)
    assert not np.allclose(fwd(qmodel, b), fwd(model, b), atol=1e-3)
    np.testing.assert_array_equal(fwd(model, b), fwd(tiny_bert(), b))     # the original is untouched


def test_straight_through_gradient_reaches_the_latent_weights():
    """d loss / d latent kernel == d loss / d kernel of the float model evaluated at TWN(kernel)."""
    model, b = tiny_bert(), batch()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 32, 32))
    manual = nnx.clone(model)
    for path, mod in nnx.iter_modules(manual):
        if isinstance(mod, nnx.Linear) and path[-1] != "classifier":
            mod.kernel[...] = quant.twn(mod.kernel[...])[0]

    def grads(m):
        def loss(m):
            return jnp.sum(fwd(m, b) ** 2)
        return nnx.grad(loss)(m)

    gq = grads(qmodel)["bert"]["encoder"]["layers"][1]["attention"]["value"]["kernel"][...]
    gm = grads(manual)["bert"]["encoder"]["layers"][1]["attention"]["value"]["kernel"][...]
    assert np.abs(gq).max() > 0
    np.testing.assert_allclose(gq, gm, rtol=1e-5, atol=1e-7)


def test_learned_activation_quantizers_need_and_get_calibration():
    model, b = tiny_bert(), batch()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 2, 4, activation_method="lsq"))
    with pytest.raises(RuntimeError, match="calibrate"):
        fwd(qmodel, b)
    n = quant.calibrate(qmodel, b)
    # inputs of q,k,v,output,intermediate,output (6) + q,k,v,probs (4) per layer, + pooler input
    assert n == L * 10 + 1
    steps = [m.step[...] for _, m in quant.quantizer_modules(qmodel) if m.quantizer.method == "lsq"]
    assert len(steps) == n and all(np.all(np.asarray(s) > 0) for s in steps)
    out = nnx.jit(fwd)(qmodel, b)
    assert np.all(np.isfinite(out))
    # steps are trainable parameters with a gradient
    g = nnx.grad(lambda m: jnp.sum(fwd(m, b) ** 2))(qmodel)
    step_grad = g["bert"]["encoder"]["layers"][0]["attention"]["query"]["input_quant"]["step"][...]
    assert np.isfinite(step_grad) and step_grad != 0


def test_cost_matches_a_hand_count():
    model, b = tiny_bert(), {k: v[:1] for k, v in batch().items()}
    fp = quant.cost_report(model, None, b)
    W = H  # attention width N*D
    linear_macs = L * (T * H * W * 4 + 2 * T * H * I)
    attn_macs = L * 2 * N * T * T * (W // N)
    head_macs = H * H + H * C
    assert fp.flops == 2 * (linear_macs + attn_macs + head_macs)
    assert fp.bops == fp.flops
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert fp.params == params and fp.size_mb == pytest.approx(params * 4 / 2**20)

    q = quant.cost_report(model, quant.make_spec(2, 2, 8), b)
    expected_bops = 2 * ((linear_macs + H * H) * 2 * 8 / 64 + attn_macs * 8 * 8 / 64 + H * C)
    assert q.bops == pytest.approx(expected_bops)
    kernels = L * (4 * H * W + 2 * H * I) + H * H
    n_kernels = L * 6 + 1
    emb = 50 * H
    bits = 32 * (params - kernels - emb) + 2 * kernels + 32 * n_kernels + 2 * emb + 32 * 50
    assert q.size_mb == pytest.approx(bits / 8 / 2**20)


def test_generic_nnx_model():
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(10, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)])

        def __call__(self, ids):
            h = self.embed(ids)
            return self.layers[1](jax.nn.relu(self.layers[0](h)))

    model = Tiny(nnx.Rngs(0))
    qmodel, report = quant.quantize_model(model, quant.make_spec(4, 8, 8))
    r = report_dict(report)
    assert r == {"embed": "uniform8/ch", "layers.0": "uniform4/ch", "layers.0.input": "uniform8",
                 "layers.1": "uniform4/ch", "layers.1.input": "uniform8"}
    ids = jnp.arange(6).reshape(2, 3)
    emb_q = quant.uniform(model.embed.embedding[...], 8, axis=1)
    h = quant.uniform(jnp.take(emb_q, ids, axis=0), 8, axis=-1)  # activations: a range per token
    h = jax.nn.relu(h @ quant.uniform(model.layers[0].kernel[...], 4, axis=0) + model.layers[0].bias[...])
    h = quant.uniform(h, 8, axis=-1) @ quant.uniform(model.layers[1].kernel[...], 4, axis=0) + model.layers[1].bias[...]
    np.testing.assert_allclose(qmodel(ids), h, atol=1e-6)
    cost = quant.cost_report(model, quant.make_spec(4, 8, 8), lambda m: m(ids[:1]))
    assert cost.flops == 2 * 3 * (8 * 8 + 8 * 4)
