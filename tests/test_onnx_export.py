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
