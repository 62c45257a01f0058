"""ONNX export (efficient_nlp.deploy): ONNX Runtime reproduces our float and integer models."""
import os

import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
pytest.importorskip("onnxruntime", reason="running the exported models needs onnxruntime")

from efficient_nlp import deploy, models, quant  # noqa: E402

import _tiny  # noqa: E402  (tests/_tiny.py)

V = 60


def feed(batch):
    return {k: np.asarray(batch[k], np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def batches():
    """Two shapes (dynamic axes), each with a padded row."""
    return [_tiny.token_batch(4, 8, V, seed=0), _tiny.token_batch(3, 13, V, seed=1)]


def run_onnx(path, batch):
    return deploy.ort_session(path, threads=1).run(["logits"], feed(batch))[0]


def family_model(model_type, seed=0, **kw):
    """A tiny sequence classifier of an encoder family, weights perturbed as in `_tiny.tiny_bert`."""
    import jax

    cfg = models.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, num_labels=3, max_position_embeddings=20, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, model_type=model_type, **kw)
    model = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params))
    return model


@pytest.fixture(scope="module")
def bert():
    return _tiny.tiny_bert(vocab=V, positions=20)


@pytest.mark.parametrize("model_type,kw", [
    ("bert", {}),
    ("bert", {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5}),
    ("roberta", {"pad_token_id": 1, "type_vocab_size": 1}),
    ("distilbert", {"type_vocab_size": 0, "hidden_act": "relu"}),
    ("electra", {"embedding_size": 8}),
], ids=["bert", "bert-tanh-gelu", "roberta", "distilbert", "electra"])
def test_float_export_matches_our_logits(model_type, kw, tmp_path):
    model = family_model(model_type, **kw)
    path = deploy.export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(path))
    for batch in batches():
        if model_type == "roberta":  # padding tokens carry the pad id (RoBERTa position ids read it)
            batch["input_ids"] = np.where(batch["attention_mask"] > 0, np.maximum(batch["input_ids"], 2), 1)
        ours = np.asarray(_tiny.logits(model, batch))
        theirs = run_onnx(path, batch)
        assert theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5 * max(1.0, np.abs(ours).max()))
    assert deploy.export_report(path) == "ONNX export: float model (no quantized sites)"


def test_padding_does_not_change_a_row(bert, tmp_path):
    """The mask bias works in the graph: a row padded with other tokens gives the same logits."""
    path = deploy.export_onnx(bert, tmp_path / "m.onnx")
    batch = _tiny.token_batch(2, 10, V)
    other = {k: v.copy() for k, v in batch.items()}
    other["input_ids"][1, 5:] = (other["input_ids"][1, 5:] + 7) % (V - 1) + 1
    a, b = run_onnx(path, batch), run_onnx(path, other)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_fixed_shapes(bert, tmp_path):
    path = deploy.export_onnx(bert, tmp_path / "m.onnx", batch=4, seq=8)
    dims = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 8]
    np.testing.assert_allclose(run_onnx(path, batches()[0]), _tiny.logits(bert, batches()[0]), atol=1e-5)


@pytest.fixture(scope="module")
def w8a8(bert):
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8))
    return quant.to_integer_model(qmodel)[0]


def test_integer_export_runs_int8_matmuls_and_matches(bert, w8a8, tmp_path):
    path = deploy.export_onnx(w8a8, tmp_path / "int.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    # 6 Linear sites x 2 layers + pooler, and q.k^T / probs.v per layer
    assert ops.count("MatMulInteger") == 2 * 6 + 1 + 2 * 2
    assert "MatMul" in ops  # the float classifier (not quantized by the default spec)
    kernels = {i.name: i for i in proto.graph.initializer}
    assert kernels["bert.encoder.layers.0.ffn.intermediate.w_codes"].data_type == onnx.TensorProto.INT8
    assert "float" not in deploy.export_report(path).split("\n", 1)[1]  # every site in int8 ops
    for batch in batches():
        ours_int = np.asarray(_tiny.logits(w8a8, batch))
        ours_float = np.asarray(_tiny.logits(bert, batch))
        theirs = run_onnx(path, batch)
        scale = np.abs(ours_float).max()
        assert np.array_equal(theirs.argmax(-1), ours_int.argmax(-1))
        assert np.abs(theirs - ours_int).max() <= 1e-3 * scale
        assert np.abs(theirs - ours_int).max() < np.abs(theirs - ours_float).max()


def test_integer_file_is_about_four_times_smaller(tmp_path):
    """int8 codes for every matmul weight and the word table; the rest (positions, LayerNorms,
    scales, the graph itself) is small next to them."""
    model = _tiny.tiny_bert(vocab=1000, hidden=128, intermediate=512, layers=1, heads=4, positions=16)
    imodel, _ = quant.to_integer_model(quant.quantize_model(model, quant.make_spec(8, 8, 8))[0])
    f = os.path.getsize(deploy.export_onnx(model, tmp_path / "f.onnx"))
    i = os.path.getsize(deploy.export_onnx(imodel, tmp_path / "i.onnx"))
    assert 3.3 < f / i < 4.05, (f, i)  # (larger models: closer to 4)


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_static_activation_steps(bert, method, tmp_path):
    """Learned (LSQ / LSQ+, PACT) activation steps become constants of the graph."""
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8, activation_method=method))
    quant.calibrate(qmodel, batches()[0])
    imodel, _ = quant.to_integer_model(qmodel)
    path = deploy.export_onnx(imodel, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "MatMulInteger" in ops
    for batch in batches():
        ours = np.asarray(_tiny.logits(imodel, batch))
        np.testing.assert_allclose(run_onnx(path, batch), ours, atol=1e-3 * np.abs(ours).max())


def test_group_scales_fall_back_to_dequantized_weights_and_say_so(bert, tmp_path, capsys):
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(4, 8, 8, weight_group_size=8))
    imodel, _ = quant.to_integer_model(qmodel)
    path = deploy.export_onnx(imodel, tmp_path / "m.onnx")
    printed = capsys.readouterr().out
    assert "bert.encoder.layers.0.ffn.intermediate" in printed and "group-wise scales (g=8)" in printed
    assert "group-wise" in deploy.export_report(path)
    for batch in batches():
        ours = np.asarray(_tiny.logits(imodel, batch))
        np.testing.assert_allclose(run_onnx(path, batch), ours, atol=1e-3 * np.abs(ours).max())


def test_fake_quant_and_unsupported_models_fail_clearly(bert, tmp_path):
    qmodel, _ = quant.quantize_model(bert, quant.make_spec(8, 8, 8))
    with pytest.raises(ValueError, match="to_integer_model"):
        deploy.export_onnx(qmodel, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="encoder sequence classifiers"):
        deploy.export_onnx(_tiny.tiny_decoder("gpt2"), tmp_path / "d.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_ort_dynamic_int8_baseline_runs(bert, tmp_path):
    path = deploy.export_onnx(bert, tmp_path / "f.onnx")
    dst = deploy.quantize_dynamic_onnx(path, tmp_path / "ort_int8.onnx")
    ops = {n.op_type for n in onnx.load(dst).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    batch = batches()[0]
    out = run_onnx(dst, batch)
    assert out.shape == (4, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="threads"):
        deploy.ort_session(path, threads=0)


# ----------------------------------------------------------------------------- static int8 (QDQ)
def static_int8(model, method, attention=False, a_bits=8):
    """`quant.to_static_int8` of ``model`` quantized W8A``a_bits`` with static ``method`` activation
    scales (PACT: signed and unsigned clip ranges; LSQ with attention quantizers: LSQ / LSQ+ steps)."""
    rules = [] if attention else [(r"\.(q|k|v|probs)$", None)]
    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, a_bits, activation_method=method, rules=rules))
    quant.calibrate(qmodel, _tiny.token_batch(6, 12, V, seed=3))
    return quant.to_static_int8(qmodel)


@pytest.fixture(scope="module", params=[("pact", False), ("lsq", True)], ids=["pact", "lsq+attention"])
def static(bert, request):
    return static_int8(bert, *request.param)


def _static_logits(static, batch):
    return np.asarray(static.forward(*(batch[k] for k in ("input_ids", "attention_mask", "token_type_ids"))))


def test_static_export_matches_static_forward(bert, static, tmp_path):
    path = deploy.export_onnx(static, tmp_path / "s.onnx")
    proto = onnx.load(path)
    ops = [n.op_type for n in proto.graph.node]
    # q/k/v (one product), attention output, FFN in and out per layer, and the pooler
    assert ops.count("QuantizeLinear") == 4 * 2 + 1 and ops.count("DequantizeLinear") == 2 * (4 * 2 + 1)
    assert "MatMulInteger" not in ops
    codes = {i.name: i.data_type for i in proto.graph.initializer if i.name.endswith(".w_codes")}
    assert len(codes) == 4 * 2 + 1 and set(codes.values()) == {onnx.TensorProto.INT8}
    report = deploy.export_report(path)
    for site in ("query", "key", "value", "output"):
        assert f"bert.encoder.layers.1.attention.{site} " in report
    assert report.count("int8 QDQ MatMul") == 6 * 2 + 1
    for batch in batches():
        ours, ours_float = _static_logits(static, batch), np.asarray(_tiny.logits(bert, batch))
        theirs = run_onnx(path, batch)
        assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))
        assert np.abs(theirs - ours).max() <= 1e-3 * np.abs(ours_float).max()
        assert np.abs(theirs - ours).max() < np.abs(theirs - ours_float).max()
    # the tuple and its model give the same file
    assert onnx.load(deploy.export_onnx(static.model, tmp_path / "m.onnx")).graph == proto.graph


def _producers(proto):
    return {out: node for node in proto.graph.node for out in node.output}


def test_quantize_linear_codes_are_our_grid(static, tmp_path):
    """On the tensors ONNX Runtime itself computes, every QuantizeLinear gives our codes shifted
    to uint8 (``activation_codes + 2^(b-1)``): same levels, clipping and half-to-even rounding
    (a value within an ulp of a tie may round the other way: see the next test)."""
    from efficient_nlp.models import family as F
    from efficient_nlp.quant import integer as I

    proto, _ = deploy.build_graph(static)
    made_by = _producers(proto)
    pairs = []
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            src = made_by[node.input[0]]
            raw = src.input[0] if src.op_type in ("Clip", "Sub") else node.input[0]
            pairs.append((node.output[0].removesuffix(".in.codes"), raw, node.output[0]))
    names = sorted({n for _, raw, codes in pairs for n in (raw, codes)})
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    onnx.save(proto, tmp_path / "probe.onnx")
    batch = batches()[1]
    values = dict(zip(names, deploy.ort_session(tmp_path / "probe.onnx", threads=1).run(names, feed(batch))))
    for path, raw, codes in pairs:
        qm = F.get_module(static.model, path).input_quant
        expected = np.asarray(I.activation_codes(qm, values[raw])[0], np.int32) + 128
        assert values[codes].dtype == np.uint8
        off = values[codes].astype(np.int32) - expected  # nonzero only within an ulp of a tie
        assert np.abs(off).max() <= 1 and np.mean(off != 0) < 1e-3, path


@pytest.mark.parametrize("method,a_bits", [("pact", 8), ("lsq", 8), ("pact", 4), ("lsq", 4)])
def test_quantize_dequantize_rounds_ties_and_clips_as_we_do(bert, method, a_bits):
    """Ties ``(k + 1/2) s`` and values beyond the clip range through the emitted ops alone: the
    codes of our grid formula in IEEE float32 (true division, half to even), exactly; our JAX
    codes (XLA:CPU divides as ``x * (1/s)``, one ulp off for some values) at most one level away
    on a tie."""
    from efficient_nlp.deploy import onnx_qdq
    from efficient_nlp.deploy.onnx_graph import Graph
    from efficient_nlp.quant import integer as I
    from efficient_nlp.quant.static_int8 import StaticLinear

    static = static_int8(bert, method, a_bits=a_bits)
    quantizers = {m.input_quant.quantizer.name: m.input_quant for _, m in nnx.iter_modules(static.model)
                  if isinstance(m, StaticLinear)}
    assert {q.quantizer.signed for q in quantizers.values()} == {True, False}
    for qm in quantizers.values():
        s, lo, hi, signed = onnx_qdq.static_grid(qm, "x")
        base = np.float32(0) if signed else lo
        k = np.arange(-300, 300, dtype=np.float32)
        x = np.concatenate([(k + 0.5) * s, k * s, np.random.default_rng(0).normal(0, 100 * s, 1000)]) + base
        x = x.astype(np.float32)
        g = Graph()
        dq, offset, _ = onnx_qdq.quantize_dequantize(g, qm, "x", "t")
        ins = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])]
        outs = [onnx.helper.make_empty_tensor_value_info(n) for n in ("t.codes", dq)]
        proto = g.model(ins, outs, opset=17, name="qdq")
        codes, dequant = deploy.ort_session(proto.SerializeToString()).run(["t.codes", dq], {"x": x})
        codes = codes.astype(np.int32)
        y = x if hi is None else np.clip(x, lo, hi)  # the grid formula, numpy float32
        half = 2 ** (a_bits - 1)
        if signed:
            expected = np.clip(np.round(y / s), -half, half - 1) + half
        else:
            expected = np.clip(np.round((y - lo) / s), 0, 2 * half - 1)
        np.testing.assert_array_equal(codes, expected.astype(np.int32))
        ours = np.asarray(I.activation_codes(qm, x)[0], np.int32) + half
        assert np.abs(codes - ours).max() <= 1 and np.mean(codes != ours) < 0.05
        assert (offset is None) == signed
        fake = np.asarray(qm(x))
        near = codes == ours
        np.testing.assert_allclose((dequant + (offset or 0))[near], fake[near], rtol=0, atol=1e-6 * np.abs(fake).max())


def test_ort_fuses_the_qdq_pairs_into_integer_matmuls(static, tmp_path):
    path = deploy.export_onnx(static, tmp_path / "s.onnx")
    ops = [n.op_type for n in onnx.load(deploy.optimized_model(path, tmp_path / "opt.onnx")).graph.node]
    # every [B, T, K] product runs ORT's uint8 x int8 kernel; only the pooler's 2-d one (after its
    # MatMul + Add -> Gemm fusion) keeps a dequantized weight
    assert ops.count("MatMulIntegerToFloat") == 4 * 2
    assert ops.count("DequantizeLinear") <= 2
    with pytest.raises(ValueError, match="level"):
        deploy.optimized_model(path, tmp_path / "x.onnx", level="max")


def test_static_file_is_about_four_times_smaller(tmp_path):
    model = _tiny.tiny_bert(vocab=1000, hidden=128, intermediate=512, layers=1, heads=4, positions=16)
    f = os.path.getsize(deploy.export_onnx(model, tmp_path / "f.onnx"))
    s = os.path.getsize(deploy.export_onnx(static_int8(model, "pact"), tmp_path / "s.onnx"))
    assert 3.3 < f / s < 4.05, (f, s)
