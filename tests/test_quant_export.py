"""Packed low-bit export (files, checksums, restore) and the integer inference path."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import quant

import _tiny  # tests/_tiny.py

H, L, N, I, C, T, V = 16, 1, 2, 32, 3, 8, 64


def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, vocab=V, hidden=H, layers=L, heads=N, intermediate=I, labels=C)


def batch(b=4):
    return _tiny.token_batch(b, T, V)


@nnx.jit
def logits(model, b):
    return model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits


@pytest.fixture(scope="module")
def float_model():
    return tiny_bert()


@pytest.fixture(scope="module")
def lsq_2_2_8(float_model):
    """TWN weights with learned (LSQ / LSQ+) 8-bit activations, calibrated."""
    return quantized(float_model, 2, 2, 8, activation_method="lsq")


def quantized(model, *bits, **kw):
    qmodel, _ = quant.quantize_model(model, quant.make_spec(*bits, **kw))
    if kw.get("activation_method", "uniform") != "uniform":
        quant.calibrate(qmodel, batch())
    return qmodel


@pytest.mark.parametrize("bits", [(1, 1, 8), (2, 2, 8), (4, 4, 8), (8, 8, 8)], ids=lambda b: "-".join(map(str, b)))
def test_packed_round_trip_through_files_is_bit_exact(float_model, bits, tmp_path):
    qmodel = quantized(float_model, *bits)
    artifact = quant.export_packed(qmodel)
    quant.save_packed(artifact, tmp_path)
    loaded = quant.load_packed(tmp_path)
    assert loaded["manifest"] == json.loads(json.dumps(artifact["manifest"]))
    assert set(loaded["tensors"]) == set(artifact["tensors"])
    for k, a in artifact["tensors"].items():
        assert loaded["tensors"][k].dtype == a.dtype and loaded["tensors"][k].shape == a.shape, k
        np.testing.assert_array_equal(loaded["tensors"][k], a, err_msg=k)

    # The packed codes really are packed, and dequantize to the fake-quant weights exactly.
    w_bits = bits[0]
    entry = loaded["manifest"]["weights"]["bert.encoder.layers.0.ffn.intermediate.kernel"]
    assert entry["pack_bits"] == w_bits and entry["method"] == {1: "bwn", 2: "twn"}.get(w_bits, "uniform")
    assert loaded["tensors"][entry["tensors"]["codes"]].nbytes == H * I * w_bits // 8
    emb = loaded["manifest"]["weights"]["bert.embeddings.word_embeddings.embedding"]
    assert loaded["tensors"][emb["tensors"]["scale"]].shape == (V, 1)          # row-wise
    values = quant.unpacked_weights(loaded)
    for path, mod, attr in quant.quantized_weights(qmodel):
        np.testing.assert_array_equal(values[f"{path}.{attr}"], mod.weight_quant(getattr(mod, attr)[...]))
    assert "classifier.kernel" in loaded["manifest"]["variables"]
    assert "bert.embeddings.position_embeddings.embedding" in loaded["manifest"]["variables"]
    assert loaded["manifest"]["config"]["hidden_size"] == H

    # Stored size: the tensor bytes are exactly the cost report's size; files add only headers.
    cost = quant.cost_report(float_model, quant.make_spec(*bits), {k: v[:1] for k, v in batch().items()})
    assert quant.artifact_nbytes(artifact) == round(cost.size_mb * 2**20)
    overhead = quant.packed_size_mb(tmp_path) * 2**20 - cost.size_mb * 2**20
    assert 0 < overhead < 48 * 1024, overhead


def test_corrupted_or_missing_files_fail_clearly(float_model, tmp_path):
    artifact = quant.export_packed(quantized(float_model, 2, 2, 8))
    with pytest.raises(quant.PackedArtifactError, match="does not exist"):
        quant.load_packed(tmp_path / "nowhere")
    good = tmp_path / "good"
    quant.save_packed(artifact, good)
    data = (good / "model.safetensors").read_bytes()

    def variant(name, blob=None, manifest=None):
        d = tmp_path / name
        d.mkdir()
        if blob is not None:
            (d / "model.safetensors").write_bytes(blob)
        if manifest is not None:
            (d / "manifest.json").write_text(manifest)
        return d

    manifest = (good / "manifest.json").read_text()
    flipped = bytearray(data)
    flipped[-3] ^= 0x10                                   # one bit in the last tensor's data
    with pytest.raises(quant.PackedArtifactError, match="checksum mismatch"):
        quant.load_packed(variant("flipped", bytes(flipped), manifest))
    with pytest.raises(quant.PackedArtifactError, match="corrupted or truncated"):
        quant.load_packed(variant("truncated", data[: len(data) // 2], manifest))
    with pytest.raises(quant.PackedArtifactError, match="lacks manifest.json"):
        quant.load_packed(variant("no_manifest", data))
    with pytest.raises(quant.PackedArtifactError, match="not JSON"):
        quant.load_packed(variant("bad_json", data, manifest[:-10]))
    m = json.loads(manifest)
    del m["tensors"]["classifier.bias"]
    with pytest.raises(quant.PackedArtifactError, match="unexpected.*classifier.bias"):
        quant.load_packed(variant("extra", data, json.dumps(m)))


def test_restored_model_gives_the_exported_outputs(float_model, lsq_2_2_8):
    """2-2-8 with LSQ activations: TWN weights (the threshold moves when re-quantized) and
    learned activation state.  Restored into a template built from another random model."""
    b = batch()
    qmodel = lsq_2_2_8
    artifact = quant.export_packed(qmodel)
    template = quantized(tiny_bert(seed=7), 2, 2, 8, activation_method="lsq")
    restored = quant.restore(artifact, template)
    expected = logits(qmodel, b)
    np.testing.assert_allclose(logits(restored, b), expected, rtol=1e-6, atol=1e-7)
    # An uncalibrated template works too: the learned activation state comes from the artefact.
    uncalibrated, _ = quant.quantize_model(tiny_bert(seed=7), quant.make_spec(2, 2, 8, activation_method="lsq"))
    np.testing.assert_allclose(logits(quant.restore(artifact, uncalibrated), b), expected, rtol=1e-6, atol=1e-7)

    # Unfrozen: the quantizers re-quantize the dequantized weights to the same codes (TWN's
    # threshold moves to 0.7 * alpha * kept/n but keeps exactly the non-zeros).
    thawed = quant.restore(artifact, template, frozen=False)
    original = dict((p, m) for p, m, _ in quant.quantized_weights(qmodel))
    for path, mod, attr in quant.quantized_weights(thawed):
        assert not mod.weight_quant.frozen
        again = quant.weight_codes(mod.weight_quant, getattr(mod, attr)[...])
        first = quant.weight_codes(original[path].weight_quant, getattr(original[path], attr)[...])
        np.testing.assert_array_equal(again["codes"], first["codes"], err_msg=path)
        np.testing.assert_allclose(again["scale"], first["scale"], rtol=1e-5, err_msg=path)  # mean's rounding
    np.testing.assert_allclose(logits(thawed, b), expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(quant.PackedArtifactError, match="exported spec"):
        quant.restore(artifact, quantized(float_model, 4, 4, 8, activation_method="lsq"))


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 4, 8), None], ids=["W8A8", "W4A8", "W2A8-twn-lsq"])
def test_integer_path_equals_fake_quant(float_model, lsq_2_2_8, bits):
    b = batch(8)
    qmodel = lsq_2_2_8 if bits is None else quantized(float_model, *bits)
    imodel, report = quant.to_integer_model(qmodel)
    # Every Linear but the (float) classifier and both attention matmuls of every layer run
    # int8 matmuls; the word embedding is int8.
    assert len(report.integer_sites) == L * 7 + 1
    assert isinstance(imodel.bert.encoder.layers[L - 1].attention.matmul_quant, quant.IntAttention)
    assert isinstance(imodel.bert.embeddings.word_embeddings, quant.IntEmbed)
    layer = imodel.bert.encoder.layers[0]
    assert layer.ffn.intermediate.w_codes[...].dtype == np.int8
    jaxpr = str(jax.make_jaxpr(lambda x: layer.ffn.intermediate(x))(np.ones((2, T, H), np.float32)))
    assert "i8" in jaxpr and "preferred_element_type=int32" in jaxpr
    fake, integer = np.asarray(logits(qmodel, b)), np.asarray(logits(imodel, b))
    np.testing.assert_allclose(integer, fake, rtol=1e-4, atol=1e-5 * np.abs(fake).max())
    np.testing.assert_array_equal(integer.argmax(-1), fake.argmax(-1))


def test_integer_linear_matches_fake_quant_for_every_activation_quantizer():
    """IntLinear against QuantLinear for uniform / LSQ / PACT, signed and unsigned inputs."""
    lin = nnx.Linear(24, 8, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(3, 24)).astype(np.float32)
    for method in ("uniform", "lsq", "pact"):
        for signed in (True, False):
            weight = quant.Quantizer("uniform", 8) if signed else quant.Quantizer("twn", 2, granularity="channel")
            q = quant.QuantLinear(lin, "lin", weight, quant.Quantizer(method, 8, signed))
            q.input_quant.observe(x)
            i = quant.IntLinear(q)
            np.testing.assert_allclose(i(x), q(x), rtol=1e-5, atol=1e-6, err_msg=f"{method} {signed}")
