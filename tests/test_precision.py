"""Mixed precision (bfloat16 compute, float32 master weights) and stated matmul precision."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _tiny import lm_batch, tiny_bert, tiny_decoder, token_batch
from efficient_nlp import distill, models, quant, train
from efficient_nlp.nas import aps
from efficient_nlp.train import precision


def _dtypes(model):
    return {".".join(map(str, p)): np.dtype(m.dtype) for p, m in nnx.iter_modules(model) if "dtype" in vars(m)}


def _param_dtypes(tree):
    return {np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(tree)}


F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def backend_default():
    """The backend's default matmul precision, even inside a suite-wide `precision.exact`."""
    return jax.default_matmul_precision(None)


# ----------------------------------------------------------------------------- compute dtype
@pytest.mark.parametrize("given, expected", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16),
                                             (jnp.bfloat16, jnp.bfloat16), (np.dtype("float32"), jnp.float32)])
def test_compute_dtype_accepts_names_and_dtypes(given, expected):
    assert precision.compute_dtype(given) == expected


@pytest.mark.parametrize("bad", ["float16", jnp.float16, "int8", "fp32", 3, None])
def test_compute_dtype_rejects_anything_else(bad):
    with pytest.raises(ValueError, match="bfloat16"):
        precision.compute_dtype(bad)


def test_set_compute_dtype_reaches_every_module_and_keeps_float32_params():
    qmodel, _ = quant.quantize_model(tiny_bert(), quant.make_spec(8, 8, 8))
    assert precision.set_compute_dtype(qmodel, "bfloat16") is qmodel
    dtypes = _dtypes(qmodel)
    kinds = {type(m).__name__ for _, m in nnx.iter_modules(qmodel) if "dtype" in vars(m)}
    assert {"QuantLinear", "QuantEmbed", "LayerNorm", "Embed"} <= kinds
    assert set(dtypes.values()) == {BF16}, dtypes
    assert _param_dtypes(nnx.state(qmodel, nnx.Param)) == {F32}
    batch = token_batch(2, 8, 50)
    out = nnx.jit(lambda m, i, mask: m(i, mask))(qmodel, batch["input_ids"], batch["attention_mask"])
    assert out.last_hidden_state.dtype == jnp.bfloat16      # the activations are bfloat16 ...
    assert out.logits.dtype == jnp.float32                   # ... the logits float32
    precision.set_compute_dtype(qmodel, jnp.float32)
    assert set(_dtypes(qmodel).values()) == {F32}


# Largest |bf16 - f32| of the logits, relative to max |f32 logit| (measured on these tiny random
# models: bert 7e-3, bert_mlm 6e-3, llama 9e-3, gpt2 9e-3).
BF16_FORWARD_RTOL = 3e-2


@pytest.mark.parametrize("kind", ["bert", "bert_mlm", "llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_bf16_forward_tracks_float32_with_float32_logits(kind):
    if kind.startswith("bert"):
        model = tiny_bert() if kind == "bert" else models.BertForMaskedLM(tiny_bert().config, rngs=nnx.Rngs(1))
        batch = token_batch(2, 10, 50)
    else:
        model = tiny_decoder(kind)
        batch = lm_batch(2, 10, 61)
    full = model(batch["input_ids"], batch["attention_mask"]).logits
    assert full.dtype == jnp.float32
    ref = np.asarray(full)
    half = precision.set_compute_dtype(train.copy_model(model), "bfloat16")
    logits = half(batch["input_ids"], batch["attention_mask"]).logits
    assert logits.dtype == jnp.float32
    err = float(np.max(np.abs(np.asarray(logits) - ref))) / float(np.max(np.abs(ref)))
    assert 0 < err < BF16_FORWARD_RTOL, err


def test_bf16_decoder_cache_matches_the_full_forward():
    model = precision.set_compute_dtype(tiny_decoder("llama"), "bfloat16")
    ids = jnp.asarray(lm_batch(2, 8, 61)["input_ids"])
    call = nnx.jit(lambda m, x, cache: m(x, cache=cache))
    full = call(model, ids, None).logits
    first = call(model, ids[:, :5], models.KVCache.empty(model.config, 2, 8))
    step = call(model, ids[:, 5:], first.cache)
    cached = jnp.concatenate([first.logits, step.logits], axis=1)
    assert cached.dtype == jnp.float32
    np.testing.assert_allclose(cached, full, atol=2e-2 * float(jnp.max(jnp.abs(full))))


def _train(model, steps=6):
    """``steps`` AdamW updates (weight decay on) of a classifier or a causal LM; returns (losses,
    state, dtypes of the logits that reached the loss)."""
    seen = []
    lm = isinstance(model, models.DecoderForCausalLM)

    def loss_fn(m, batch, rngs):
        logits = m(batch["input_ids"], batch["attention_mask"]).logits
        seen.append(logits.dtype)
        if lm:
            return distill.next_token_loss(logits, batch["input_ids"], batch["attention_mask"])[0], None
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), None

    config = {"learning_rate": 3e-3, "warmup_ratio": 0.0, "weight_decay": 0.01, "grad_clip": 1.0}
    tx = train.make_optimizer(config, steps)
    graphdef, state = train.init_state(model, tx)
    step = jax.jit(train.make_step(loss_fn, tx), static_argnums=0)
    batch = lm_batch(4, 10, 61) if lm else {**token_batch(4, 10, 50), "labels": np.array([0, 1, 2, 1], np.int32)}
    losses = []
    for t in range(steps):
        state, metrics = step(graphdef, state, batch, jax.random.key(t))
        losses.append(float(metrics["loss"]))
    return losses, state, seen


@pytest.mark.parametrize("make", [tiny_bert, tiny_decoder], ids=["bert", "llama"])
def test_bf16_training_keeps_float32_master_weights_and_tracks_the_float32_loss(make):
    losses32, _, _ = _train(make())
    losses16, state16, seen = _train(precision.set_compute_dtype(make(), "bfloat16"))
    assert seen and {np.dtype(d) for d in seen} == {F32}     # float32 logits reach the loss
    assert _param_dtypes(state16.params) == {F32}
    opt_floats = [x for x in jax.tree.leaves(state16.opt_state) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    assert opt_floats and {np.dtype(jnp.result_type(x)) for x in opt_floats} == {F32}
    assert losses16[-1] < losses16[0]                        # it trains
    np.testing.assert_allclose(losses16, losses32, rtol=5e-3)   # measured: 3e-4 (bert), 2e-4 (llama)


# ----------------------------------------------------------------------------- matmul precision
def test_exact_is_a_context_manager_and_a_decorator():
    def dot_precision():
        jaxpr = jax.make_jaxpr(jnp.matmul)(jnp.ones((2, 3)), jnp.ones((3, 2))).jaxpr
        while jaxpr.eqns[0].primitive.name != "dot_general":    # a jit wrapper around it
            jaxpr = next(jax.extend.core.jaxprs_in_params(jaxpr.eqns[0].params))
        return jaxpr.eqns[0].params.get("precision")

    with backend_default():
        assert dot_precision() is None
        with precision.exact():
            assert jax.config.jax_default_matmul_precision == "highest"
            assert dot_precision() == (jax.lax.Precision.HIGHEST,) * 2
        assert dot_precision() is None and jax.config.jax_default_matmul_precision is None
        assert precision.exact()(dot_precision)() == (jax.lax.Precision.HIGHEST,) * 2


def test_emulated_rounds_float_matmul_operands_only():
    x = jax.random.normal(jax.random.key(0), (32, 64))
    w = jax.random.normal(jax.random.key(1), (64, 16))
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    scale = np.max(np.abs(ref))
    with backend_default():
        err = {m: np.max(np.abs(np.asarray(precision.emulated(jnp.matmul, m)(x, w)) - ref)) / scale
               for m in precision.EMULATED_PRECISIONS}
    assert 1e-3 < err["bfloat16"] < 2e-2 and 1e-4 < err["tensorfloat32"] < 2e-3, err
    with precision.exact():
        np.testing.assert_allclose(precision.emulated(jnp.matmul)(x, w), ref, atol=1e-5 * scale)
    xi, wi = (jnp.round(a * 20).astype(jnp.int8) for a in (x, w))
    int_dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    with backend_default():
        np.testing.assert_array_equal(precision.emulated(int_dot)(xi, wi), int_dot(xi, wi))
    # TF32 keeps 10 explicit mantissa bits, rounding to nearest even.
    assert float(precision.round_to(jnp.float32(1 + 2.0 ** -11 + 2.0 ** -13), "tensorfloat32")) == 1 + 2.0 ** -10
    assert float(precision.round_to(jnp.float32(1 + 2.0 ** -11), "tensorfloat32")) == 1.0
    with pytest.raises(ValueError, match="tensorfloat32"):
        precision.emulated(jnp.matmul, "fp8")


def test_aps_ordinal_candidates_stay_exact_slices_at_reduced_default_precision():
    layer = aps.ApsDense(8, 6, in_widths=(2, 5, 8), out_widths=(3, 6), rngs=nnx.Rngs(0))
    w = np.asarray(layer.kernel[...])
    with backend_default():
        for i, ci in enumerate((2, 5, 8)):
            for o, co in enumerate((3, 6)):
                got = precision.emulated(lambda: layer.candidate_kernel(i, o))()
                np.testing.assert_array_equal(got, w[:ci, :co])
        # Without the stated precision the same projection is rounded (the emulation has teeth).
        q = jnp.asarray(layer.q[...][1])
        rounded = precision.emulated(lambda: jnp.einsum("io,ia->ao", layer.kernel[...], q))()
    assert not np.array_equal(np.asarray(rounded)[:5], w[:5])


# Stated tolerances at an emulated reduced default precision (bfloat16 one-pass / TF32), tiny
# W8A8 BERT, relative to max |logit| (measured: float drift 6e-3 / 5e-4, fake quant vs integer
# 5e-3 / 4e-4, under exact() 2e-7):  float model drift <= 2e-2 (bf16) / 2e-3 (TF32); fake quant
# vs integer model <= 2e-2 (either: the float path's rounding can flip an activation code by one
# grid step); integer model (all matmuls int8) unchanged; under exact(): fake quant vs integer
# <= 1e-6.
@pytest.mark.parametrize("mode, float_rtol", [("bfloat16", 2e-2),
                                              pytest.param("tensorfloat32", 2e-3, marks=pytest.mark.slow)])
def test_exactness_claims_under_emulated_reduced_precision(mode, float_rtol):
    model = tiny_bert(seed=3)
    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))
    imodel, _ = quant.to_integer_model(qmodel)
    b = token_batch(3, 12, 50)
    args = (jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
    def outputs(i, m):
        out = imodel(i, m)
        return {"float": model(i, m).logits, "fake": qmodel(i, m).logits, "int": out.logits,
                "int_hidden": out.last_hidden_state}                   # int8 matmuls only

    with backend_default():
        reduced = jax.tree.map(np.asarray, precision.emulated(outputs, mode)(*args))
    with precision.exact():
        highest = jax.tree.map(np.asarray, precision.emulated(outputs, mode)(*args))
    scale = float(np.max(np.abs(highest["float"])))

    def rel(a, b):
        return float(np.max(np.abs(a - b))) / scale

    np.testing.assert_array_equal(reduced["int_hidden"], highest["int_hidden"])       # (a)
    assert 0 < rel(reduced["float"], highest["float"]) < float_rtol                      # (b)
    assert 1e-5 < rel(reduced["fake"], reduced["int"]) < 2e-2
    assert rel(highest["fake"], highest["int"]) < 1e-6                                  # (c)
