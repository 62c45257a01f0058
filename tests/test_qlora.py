"""QLoRA's frozen 4-bit base: NF4 levels against the paper's table, block and double quantization
error bounds, bit-exact packing, the QAT ("lsq") grid reproduced bit for bit, the model transform,
the custom VJP that saves codes instead of the float kernel, and LoRA training on the packed base."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _tiny import logits, lm_batch, tiny_bert, tiny_decoder, token_batch
from efficient_nlp import models, quant, train
from efficient_nlp.models import family as F
from efficient_nlp.peft import qlora as QL
from efficient_nlp.quant.packing import unpack

# QLoRA (Dettmers et al. 2023), Appendix E: the NF4 data type.
NF4_PAPER = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


@pytest.fixture(scope="module")
def bert():
    """One tiny BERT for the module (every transform below returns a copy and leaves it as it is)."""
    return tiny_bert()


def gaussian(shape, seed=0, outliers=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    w.reshape(-1)[rng.choice(w.size, outliers, replace=False)] *= 10
    return w


def test_nf4_levels_match_the_paper():
    levels = QL.nf4_levels()
    np.testing.assert_allclose(levels, NF4_PAPER, rtol=0, atol=1e-6)
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7 and levels[7] == 0.0
    assert levels[0] == -1.0 and levels[-1] == 1.0 and np.all(np.diff(levels) > 0)
    np.testing.assert_array_equal(QL.grid_levels("int4"), (np.arange(-7, 8) / 7).astype(np.float32))


@pytest.mark.parametrize("grid", ["nf4", "int4"])
def test_block_error_is_bounded_by_half_the_largest_gap(grid):
    w = gaussian((64, 48), outliers=5)
    codes, absmax = QL.quantize_blocks(w, grid, block_size=64)
    assert codes.dtype == np.uint8 and codes.shape == (w.size,) and absmax.shape == (w.size // 64,)
    assert codes.max() < len(QL.grid_levels(grid))
    np.testing.assert_array_equal(absmax, np.abs(w.reshape(-1, 64)).max(1))
    back = np.asarray(QL.dequantize_blocks(codes, absmax, grid, w.shape))
    half_gap = np.diff(QL.grid_levels(grid)).max() / 2
    bound = np.repeat(absmax, 64).reshape(w.shape) * half_gap
    assert np.all(np.abs(back - w) <= bound * (1 + 1e-6))
    # Each block's abs-max element is reproduced (it maps to +-1).
    blocks, back_blocks = w.reshape(-1, 64), back.reshape(-1, 64)
    top = np.abs(blocks).argmax(1)
    np.testing.assert_allclose(back_blocks[np.arange(len(top)), top], blocks[np.arange(len(top)), top], rtol=1e-6)


def test_nf4_beats_uniform_int4_on_normal_weights():
    """NF4 is built for normally distributed weights (the paper's claim): lower error than int4."""
    w = gaussian((256, 256), seed=1)
    err = {g: np.mean((np.asarray(QL.dequantize_blocks(*QL.quantize_blocks(w, g), g, w.shape)) - w) ** 2)
           for g in ("nf4", "int4")}
    assert err["nf4"] < 0.8 * err["int4"]


def test_double_quantization_round_trip():
    absmax = np.abs(gaussian((300,), seed=2)) + 0.5  # 300 = one full block of 256 and a short one
    dq = QL.double_quantize(absmax, block_size=256)
    assert dq.codes.dtype == np.int8 and dq.codes.shape == (300,) and np.abs(dq.codes.astype(int)).max() <= 127
    assert dq.scales.shape == (2,) and dq.offset.shape == ()
    np.testing.assert_allclose(dq.offset, absmax.mean(), rtol=1e-6)
    back = np.asarray(QL.double_dequantize(dq, block_size=256))
    step = np.repeat(dq.scales, 256)[:300]
    assert np.all(np.abs(back - absmax) <= step / 2 + 1e-6)  # + float32 rounding of the sum
    assert np.abs(back - absmax).max() > 0  # 8 bits are lossy: the bound is what holds
    # The centred extreme of each block is exact up to rounding (code +-127).
    centred = absmax - dq.offset
    for blk in range(2):
        i = blk * 256 + np.abs(centred[blk * 256:(blk + 1) * 256]).argmax()
        assert abs(int(dq.codes[i])) == 127


@pytest.mark.parametrize("double_quant", [True, False])
def test_packed_linear_stores_packed_codes_that_dequantize_exactly(double_quant):
    lin = nnx.Linear(64, 96, rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.asarray(gaussian((64, 96), seed=3, outliers=3))
    packed = QL.PackedLinear.from_linear(lin, "nf4", 64, double_quant)
    codes, absmax = QL.quantize_blocks(lin.kernel[...], "nf4", 64)
    stored = np.asarray(packed.codes[...])
    assert stored.dtype == np.uint8 and stored.shape == (64 * 96 // 2,)
    np.testing.assert_array_equal(unpack(stored, 4, codes.size, signed=False), codes)
    scales = QL.double_dequantize(QL.double_quantize(absmax)) if double_quant else absmax
    np.testing.assert_array_equal(np.asarray(packed.dequantize()),
                                  np.asarray(QL.dequantize_blocks(codes, scales, "nf4", (64, 96))))
    n = 64 * 96
    expected = n // 2 + (n // 64 + 4 * -(-n // 64 // 256) + 4 if double_quant else 4 * n // 64)
    assert packed.nbytes == expected
    assert not nnx.state(packed, nnx.Param)  # nothing an optimizer could select
    x = jax.random.normal(jax.random.key(0), (3, 64))
    np.testing.assert_allclose(packed(x), x @ packed.dequantize() + lin.bias[...], rtol=1e-6, atol=1e-6)


def test_a_non_finite_input_row_leaves_the_other_rows_alone():
    """The dequantization is tied to the input's first element (see the custom VJP); a NaN / inf
    there must not reach the other rows, in the forward or the backward pass."""
    packed = QL.PackedLinear.from_linear(nnx.Linear(64, 32, rngs=nnx.Rngs(4)))
    x = jax.random.normal(jax.random.key(5), (3, 64))
    for bad in (np.nan, np.inf):
        y = x.at[0, 0].set(bad)
        np.testing.assert_array_equal(packed(y)[1:], packed(x)[1:])
        g = jax.grad(lambda v: jnp.sum(packed(v)[1:]))(y)
        np.testing.assert_array_equal(g, jax.grad(lambda v: jnp.sum(packed(v)[1:]))(x))


def test_packed_matmul_recomputes_the_kernel_in_the_backward_pass():
    lin = nnx.Linear(64, 48, rngs=nnx.Rngs(1))
    packed = QL.PackedLinear.from_linear(lin)
    w = packed.dequantize()
    x = jax.random.normal(jax.random.key(2), (4, 64))
    g = jax.random.normal(jax.random.key(3), (4, 48))
    _, vjp_packed = jax.vjp(lambda v: packed(v), x)
    _, vjp_dense = jax.vjp(lambda v: v @ w + packed.bias[...], x)
    np.testing.assert_allclose(vjp_packed(g)[0], vjp_dense(g)[0], rtol=1e-5, atol=1e-5)

    def float_kernels(vjp_fn):
        return [a.shape for a in jax.tree.leaves(vjp_fn)
                if a.shape == (64, 48) and jnp.issubdtype(a.dtype, jnp.floating)]

    assert float_kernels(vjp_dense) == [(64, 48)]   # the check can fail: plain autodiff keeps W
    assert float_kernels(vjp_packed) == []          # the packed layer keeps codes and scales
    kept = {a.dtype for a in jax.tree.leaves(vjp_packed)}
    assert np.dtype(np.uint8) in kept


def test_compiled_backward_holds_one_float_kernel_at_a_time():
    """XLA's plan of a gradient through 6 packed layers: the temporaries hold about one float
    kernel, where plain autodiff of ``x @ dequantize()`` keeps all six for the backward pass."""
    stack = nnx.List([QL.PackedLinear.from_linear(nnx.Linear(256, 256, rngs=nnx.Rngs(i))) for i in range(6)])
    graphdef, state = nnx.split(stack)
    x = jnp.ones((2, 256))

    def temp_bytes(call):
        def loss(x, state):
            for layer in nnx.merge(graphdef, state):
                x = jnp.tanh(call(layer, x))
            return jnp.sum(x)
        return jax.jit(jax.grad(loss)).lower(x, state).compile().memory_analysis().temp_size_in_bytes

    kernel = 256 * 256 * 4
    assert temp_bytes(lambda layer, v: layer(v)) < 2 * kernel
    assert temp_bytes(lambda layer, v: v @ layer.dequantize()) >= 6 * kernel


def test_quantize_base_packs_every_layer_site_and_keeps_no_float_kernel(bert):
    model, batch = bert, token_batch(4, 12, 50)
    qmodel, report = QL.quantize_base(model)
    sites = F.sites(model)
    assert report.sites == tuple(s.path for s in sites) and len(sites) == 12
    params = models.named_params(qmodel)
    for s in sites:
        assert isinstance(F.get_module(qmodel, s.path), QL.PackedLinear)
        assert not [k for k in params if k.startswith(s.path + ".")]
        assert isinstance(F.get_module(model, s.path), nnx.Linear)  # the input model is unchanged
    assert F.word_embedding_path(model) + ".embedding" in params and any(k.startswith(F.head_paths(model)[-1])
                                                                         for k in params)
    # The packed model is the float model with the dequantized kernels, exactly.
    dense = train.copy_model(model)
    for s in sites:
        F.get_module(dense, s.path).kernel[...] = F.get_module(qmodel, s.path).dequantize()
    np.testing.assert_allclose(logits(qmodel, batch), logits(dense, batch), rtol=1e-5, atol=1e-6)
    # NF4 moves each kernel by ~9% RMS (test_nf4_beats_uniform_int4_on_normal_weights' weights:
    # 0.092); two post-LayerNorm layers do not amplify that.
    ref = np.asarray(logits(model, batch))
    rel = np.linalg.norm(np.asarray(logits(qmodel, batch)) - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.09
    assert report.params == sum(F.get_module(model, s.path).kernel.size for s in sites)
    assert report.float_bytes == 4 * report.params
    assert "12 Linear sites" in str(report) and "nf4" in str(report)


def test_bits_per_parameter_match_the_papers_accounting():
    """4 bits of code + 8/64 (int8 abs-max per block of 64) + 32/(64*256) (float32 scale per 256
    blocks) = 4.127 bits, + one float32 mean per kernel; 4.5 bits without double quantization."""
    cfg = models.BertConfig(vocab_size=30, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=512, num_labels=2, max_position_embeddings=8)
    model = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    _, dq = QL.quantize_base(model)
    _, plain = QL.quantize_base(model, double_quant=False)
    assert dq.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 * 6 / dq.params, rel=1e-12)
    assert 4.127 < dq.bits_per_param < 4.128
    assert plain.bits_per_param == 4.5


def test_quantize_base_works_for_a_gated_decoder():
    model, batch = tiny_decoder("llama"), lm_batch(2, 10, 61)
    qmodel, report = QL.quantize_base(model, grid="int4", double_quant=False, roles=("q", "ffn_gate"))
    assert [F.site_of(model, p).role for p in report.sites] == ["q", "ffn_gate"] * 2
    dense = train.copy_model(model)
    for path in report.sites:
        F.get_module(dense, path).kernel[...] = F.get_module(qmodel, path).dequantize()
    np.testing.assert_allclose(logits(qmodel, batch), logits(dense, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,granularity", [("lsq", "channel"), ("uniform", "tensor"), ("lsq", "group")])
def test_lsq_grid_dequantizes_exactly_to_the_qat_weight(bert, method, granularity):
    model, batch = bert, token_batch(4, 12, 50)
    spec = quant.make_spec(4, 32, 16, weight_method=method, weight_granularity=granularity,
                           weight_group_size=8 if granularity == "group" else 0)
    qat, _ = quant.quantize_model(model, spec)
    if method == "lsq":  # steps that training moved away from their initialisation
        for path, mod in quant.transform.quantizer_modules(qat):
            mod.step[...] = mod.step[...] * jax.random.uniform(jax.random.key(len(path)), mod.step.shape,
                                                               minval=0.7, maxval=1.3)
    packed, report = QL.quantize_base(qat, grid="lsq")

    def weights(qat, packed):  # the QAT forward's fake-quantized weights, the packed base's kernels
        mods = [(F.get_module(qat, p), F.get_module(packed, p)) for p in report.sites]
        return [q.weight_quant(q.kernel[...]) for q, _ in mods], [p.dequantize() for _, p in mods]

    for fake, kernels in (weights(qat, packed), nnx.jit(weights)(qat, packed)):  # eager and jitted
        for a, b in zip(fake, kernels):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    if granularity == "channel":  # the model runs the same weights (one case: each compiles twice)
        np.testing.assert_allclose(logits(packed, batch), logits(qat, batch), rtol=1e-6, atol=1e-6)
    assert report.block_size is None and not report.double_quant


def test_errors_name_the_problem(bert):
    model = bert
    with pytest.raises(ValueError, match=r"unknown grid 'fp4'.*'nf4', 'int4', 'lsq'"):
        QL.quantize_base(model, grid="fp4")
    with pytest.raises(ValueError, match=r"block_size 48 does not divide the 256 elements.*\[16, 32, 64"):
        QL.quantize_base(model, block_size=48)
    with pytest.raises(ValueError, match="unknown role"):
        QL.quantize_base(model, roles=("query",))
    with pytest.raises(ValueError, match="from_quant_linear"):
        QL.quantize_blocks(np.ones(64), "lsq")
    eight, _ = quant.quantize_model(model, quant.make_spec(8, 32, 16))
    with pytest.raises(ValueError, match="signed 4-bit uniform or LSQ.*uniform8/ch"):
        QL.quantize_base(eight, grid="lsq")
    ternary, _ = quant.quantize_model(model, quant.make_spec(2, 32, 16))
    with pytest.raises(ValueError, match="twn2"):
        QL.quantize_base(ternary, grid="lsq")
    w4a8, _ = quant.quantize_model(model, quant.make_spec(4, 32, 8, weight_method="lsq"))
    with pytest.raises(ValueError, match="quantizes its input"):
        QL.quantize_base(w4a8, grid="lsq")
    with pytest.raises(ValueError, match="is a QuantLinear; grid 'nf4' packs float nnx.Linear"):
        QL.quantize_base(eight)
    with pytest.raises(ValueError, match="grid 'lsq'"):
        QL.quantize_base(model, grid="lsq")


LORA = os.path.join(os.path.dirname(__file__), "..", "efficient_nlp", "peft", "lora.py")


@pytest.mark.skipif(not os.path.exists(LORA), reason="efficient_nlp/peft/lora.py is not written yet")
def test_lora_trains_on_the_packed_base_and_leaves_it_bit_identical(bert):
    from efficient_nlp.peft import lora as L

    model, batch = bert, token_batch(8, 12, 50)
    batch["labels"] = np.arange(8, dtype=np.int32) % 3
    qmodel, _ = QL.quantize_base(model)
    lmodel, _ = L.add_lora(qmodel, roles=("q", "v", "ffn_in"), rank=4, alpha=8)
    before = jax.tree.map(np.asarray, nnx.state(lmodel, QL.QuantizedBase))

    def loss_fn(m, b, rngs):
        out = F.forward(m, b)
        return optax.softmax_cross_entropy_with_integer_labels(out.logits, b["labels"]).mean(), None

    trained, history = train.run(lmodel, loss_fn, optax.adam(1e-2), [batch] * 20, steps=20,
                                 trainable=L.trainable(lmodel))
    after = jax.tree.map(np.asarray, nnx.state(trained, QL.QuantizedBase))
    assert len(jax.tree.leaves(before)) == 12 * 5  # codes, 3 double-quantized scale arrays, bias per site
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    lora = L.wrappers(trained)
    assert len(lora) == 6 and all(isinstance(w.base, QL.PackedLinear) for w in lora.values())
    assert all(np.abs(np.asarray(w.lora_b[...])).max() > 0 for w in lora.values())  # the factors trained
