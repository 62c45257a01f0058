"""The compressed-tensors (pack-quantized) checkpoint format, checked against the
``compressed-tensors`` package itself: its packing and decompression give our codes and our
dequantized weights exactly, its pydantic config parses ours, ``transformers`` loads our
directories, a checkpoint the package compressed loads into our (integer) models, and errors."""
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import quant
from efficient_nlp.models import family as F
from efficient_nlp.models import hf_checkpoint as H
from efficient_nlp.quant import compressed_tensors as CT
from efficient_nlp.quant.export import quantized_weights, weight_codes

import _tiny  # tests/_tiny.py

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme)
from safetensors.torch import load_file, save_file  # noqa: E402

GROUPS = "group" in quant.spec.GRANULARITIES
V, T = 50, 8


def _bert():
    """LSQ 4-bit weights per output channel, a 4-bit word-embedding table, float classifier."""
    return _tiny.tiny_bert(), quant.make_spec(4, 4, 32, weight_method="lsq"), "classification"


def _llama():
    """Group-wise LSQ 4-bit (g = 8), TWN (per tensor, stored as 2 bits) on the FFN output,
    uniform 8-bit per channel on the untied LM head; every Linear quantized."""
    weight = {"weight_group_size": 8} if GROUPS else {}
    spec = quant.make_spec(4, 32, 32, weight_method="lsq", **weight,
                           rules=[(r"ffn\.output$", {"method": "twn", "granularity": "tensor"}),
                                  (r"^lm_head$", {"method": "uniform", "bits": 8, "granularity": "channel"})])
    return _tiny.tiny_decoder(), spec, None


CASES = {"bert": _bert, "llama": _llama}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """``(name, qmodel, directory, head)`` for each case, saved once."""
    model, spec, head = CASES[request.param]()
    qmodel, _ = quant.quantize_model(model, spec)
    out = str(tmp_path_factory.mktemp(request.param))
    CT.save_compressed_tensors(qmodel, out)
    return request.param, qmodel, out, head


def ids_for(name):
    return _tiny.token_batch(2, T, V if name == "bert" else 61)


def run(model, b):
    return np.asarray(model(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])).logits)


def hf_modules(qmodel) -> dict[str, str]:
    """Our module path -> its HF module name in a task checkpoint (family prefix on the base
    model's tensors, none on the heads), from the family's name table."""
    fam = F.family_of(qmodel)
    heads = tuple(g for g in fam.hf_head_groups if g != "pooler.")
    out = {}
    for name, (ours, _) in H.hf_name_map(qmodel).items():
        if isinstance(ours, str) and ours.endswith((".kernel", ".embedding")):
            full = name if name.startswith(heads) else fam.hf_prefix + name
            out[ours.rsplit(".", 1)[0]] = full[: -len(".weight")]
    return out


def expected_scheme(q):
    bits = 2 if q.method in ("twn", "bwn") else q.bits
    return bits, q.granularity, (q.group_size if q.granularity == "group" else None)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_int32_is_the_packages_layout(bits):
    """Rows whose length is not a multiple of 32 / b exercise the padding of the last word."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.random.default_rng(bits).integers(lo, hi + 1, (5, 37)).astype(np.int8)
    ours = CT.pack_int32(codes, bits)
    theirs = pack_to_int32(torch.from_numpy(codes), bits).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(CT.unpack_int32(ours, bits, codes.shape), codes)
    np.testing.assert_array_equal(unpack_from_int32(torch.from_numpy(ours), bits, torch.Size(codes.shape)).numpy(),
                                  codes)


# ----------------------------------------------------------------------------- saving
def test_config_parses_and_describes_every_linear(saved):
    name, qmodel, out, _ = saved
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "pack-quantized"
    names = hf_modules(qmodel)
    quantized = {names[p]: mod.weight_quant.quantizer for p, mod, _ in quantized_weights(qmodel)
                 if isinstance(mod, quant.QuantLinear)}
    targeted = {}
    for scheme in parsed.config_groups.values():
        assert scheme.input_activations is None and scheme.weights.type == "int" and scheme.weights.symmetric
        for t in scheme.targets:
            targeted[t] = (scheme.weights.num_bits, scheme.weights.strategy, scheme.weights.group_size)
    assert targeted == {m: expected_scheme(q) for m, q in quantized.items()}
    paths = [".".join(map(str, p)) for p, m in nnx.iter_modules(qmodel) if isinstance(m, (nnx.Linear, quant.QuantLinear))]
    linears = {names[p] for p in paths}
    assert sorted(parsed.ignore) == sorted(linears - set(quantized))
    if name == "bert":
        assert parsed.ignore == ["classifier"]
    else:
        assert {s for s in targeted.values()} == ({(4, "group", 8)} if GROUPS else {(4, "channel", None)}) | {
            (2, "tensor", None), (8, "channel", None)}


def test_package_decompression_gives_our_dequantized_weights_exactly(saved, tmp_path):
    """Packed weights: the package's own decompression == our fake-quantized kernel, transposed,
    and its packing of our codes == our weight_packed; every other tensor is the plain HF
    checkpoint's (a quantized embedding: its dequantized table)."""
    name, qmodel, out, _ = saved
    stored = load_file(os.path.join(out, "model.safetensors"))
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).process(dict(stored))
    plain = load_file(os.path.join(H.save_hf_checkpoint(qmodel, tmp_path), "model.safetensors"))
    assert set(dense) == set(plain)
    names = hf_modules(qmodel)
    checked = set()
    for path, mod, attr in quantized_weights(qmodel):
        hf = names[path] + ".weight"
        w = getattr(mod, attr)[...]
        ours = np.asarray(mod.weight_quant(w))
        if isinstance(mod, quant.QuantLinear):
            ours = ours.T
            bits = expected_scheme(mod.weight_quant.quantizer)[0]
            codes = np.asarray(weight_codes(mod.weight_quant, w)["codes"]).T
            np.testing.assert_array_equal(stored[names[path] + ".weight_packed"].numpy(),
                                          pack_to_int32(torch.from_numpy(np.ascontiguousarray(codes)), bits).numpy())
        assert dense[hf].dtype == torch.float32
        np.testing.assert_array_equal(dense[hf].numpy(), ours, err_msg=hf)
        checked.add(hf)
    assert any(k.endswith("word_embeddings.weight") for k in checked) == (name == "bert")
    for k in set(plain) - checked:
        np.testing.assert_array_equal(dense[k].numpy(), plain[k].numpy(), err_msg=k)


def test_transformers_loads_our_directory(saved):
    transformers = pytest.importorskip("transformers")
    name, qmodel, out, _ = saved
    cls = transformers.AutoModelForSequenceClassification if name == "bert" else transformers.AutoModelForCausalLM
    hf = cls.from_pretrained(out).eval()
    b = ids_for(name)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(b["input_ids"]).long(),
                    attention_mask=torch.tensor(b["attention_mask"]).long()).logits.numpy()
    np.testing.assert_allclose(theirs, run(qmodel, b), atol=1e-5)


def test_activation_quantizers_are_not_stored_and_warn(tmp_path):
    qmodel, _ = quant.quantize_model(_tiny.tiny_bert(), quant.make_spec(8, 32, 8))
    with pytest.warns(UserWarning, match="weight-only.*activation quantizer"):
        CT.save_compressed_tensors(qmodel, tmp_path)
    qc = QuantizationConfig.model_validate(json.load(open(tmp_path / "config.json"))["quantization_config"])
    assert all(s.input_activations is None and s.output_activations is None for s in qc.config_groups.values())


@pytest.mark.parametrize("case", ["3-bit", "asymmetric", "gpt2-conv1d", "nothing-quantized"])
def test_save_errors_name_the_problem_and_the_fix(case, tmp_path):
    model = _tiny.tiny_decoder("gpt2") if case == "gpt2-conv1d" else _tiny.tiny_bert()
    spec, match = {
        "3-bit": (quant.make_spec(3, 32, 32), r"3-bit weights .* \(2, 4, 8\) bits.* 4 or 8 bits"),
        "asymmetric": (quant.make_spec(4, 32, 32, rules=[(r"query$", {"signed": False})]), r"symmetric.*signed=True"),
        "gpt2-conv1d": (quant.make_spec(4, 32, 32), r"Conv1D weight \[in, out\] fused with 2 other.*payload None"),
        "nothing-quantized": (quant.make_spec(32, 32, 32), r"no quantized Linear weights.*save_hf_checkpoint"),
    }[case]
    qmodel, _ = quant.quantize_model(model, spec)
    with pytest.raises(ValueError, match=match):
        CT.save_compressed_tensors(qmodel, tmp_path)
    assert not os.path.exists(tmp_path / "model.safetensors")


# ----------------------------------------------------------------------------- loading
def test_round_trip_is_exact_and_runs_in_integers(saved, tmp_path):
    name, qmodel, out, head = saved
    loaded = CT.load_compressed_tensors(out, head=head)
    b = ids_for(name)
    want = run(qmodel, b)
    np.testing.assert_array_equal(run(loaded, b), want)
    before = {p: m.weight_quant.quantizer for p, m, _ in quantized_weights(qmodel) if isinstance(m, quant.QuantLinear)}
    after = {p: m.weight_quant.quantizer for p, m, _ in quantized_weights(loaded)}
    assert set(after) == set(before)
    for p, q in after.items():
        assert q.method == "lsq" and q.signed and expected_scheme(q) == expected_scheme(before[p]), p
    imodel, report = quant.to_integer_model(loaded)
    assert [kind for _, kind, _ in report.rows] == ["int8 weight"] * len(after)
    np.testing.assert_allclose(run(imodel, b), want, rtol=1e-5, atol=1e-5)
    # Saving the loaded model again writes the same tensors.
    again = load_file(os.path.join(CT.save_compressed_tensors(loaded, tmp_path), "model.safetensors"))
    first = load_file(os.path.join(out, "model.safetensors"))
    assert set(again) == set(first)
    for k in first:
        np.testing.assert_array_equal(again[k].numpy(), first[k].numpy(), err_msg=k)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A tiny transformers Llama (the shape of the "llama" case) whose Linear weights (not
    lm_head) the package compressed itself: 4-bit symmetric, group_size 8, targets ["Linear"],
    ignore ["lm_head"]."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    out = str(tmp_path_factory.mktemp("foreign"))
    hf.save_pretrained(out)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=8))
    tensors = {}
    for name, w in load_file(os.path.join(out, "model.safetensors")).items():
        if re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight", name):
            scale = w.reshape(w.shape[0], -1, 8).abs().amax(-1) / 7
            state = {"weight": w, "weight_scale": scale, "weight_zero_point": torch.zeros_like(scale, dtype=torch.int8)}
            for part, t in PackedQuantizationCompressor.compress(state, scheme).items():
                tensors[name[: -len("weight")] + part] = t
        else:
            tensors[name] = w
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
        ignore=["lm_head"]).model_dump(mode="json")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out, transformers


@pytest.mark.skipif(not GROUPS, reason="group-wise scales (Quantizer granularity='group') not available")
def test_checkpoint_compressed_by_the_package_loads_into_our_integer_path(foreign):
    out, transformers = foreign
    qmodel = CT.load_compressed_tensors(out)
    dense = CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_file(os.path.join(out, "model.safetensors")))
    names = hf_modules(qmodel)
    sites = {p: m for p, m, _ in quantized_weights(qmodel)}
    assert {names[p] for p in sites} == {k[: -len(".weight")] for k in dense if re.search(r"_proj\.weight$", k)}
    assert not isinstance(qmodel.lm_head, quant.QuantLinear)
    for p, m in sites.items():
        q = m.weight_quant.quantizer
        assert (q.method, q.bits, q.granularity, q.group_size) == ("lsq", 4, "group", 8)
        np.testing.assert_array_equal(np.asarray(m.weight_quant(m.kernel[...])).T, dense[names[p] + ".weight"].numpy())
    b = ids_for("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(b["input_ids"]).long(),
                    attention_mask=torch.tensor(b["attention_mask"]).long()).logits.numpy()
    ours = run(qmodel, b)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    imodel, _ = quant.to_integer_model(qmodel)
    np.testing.assert_allclose(run(imodel, b), ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    qmodel, _ = quant.quantize_model(_tiny.tiny_bert(), quant.make_spec(4, 32, 32, weight_method="lsq"))
    return CT.save_compressed_tensors(qmodel, tmp_path_factory.mktemp("bert_errors")), qmodel


def _edit_config(d, fn):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)


def _edit_tensors(d, fn):
    tensors = load_file(os.path.join(d, "model.safetensors"))
    fn(tensors)
    save_file(tensors, os.path.join(d, "model.safetensors"))


Q = "bert.encoder.layer.0.attention.self.query"


def _weights(cfg):
    return cfg["quantization_config"]["config_groups"]["group_0"]["weights"]


def _truncate(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


LOAD_ERRORS = {
    "missing-scale": (lambda d: _edit_tensors(d, lambda t: t.pop(Q + ".weight_scale")),
                      rf"{Q}\.weight_scale missing.*incomplete or corrupted"),
    "short-packed": (lambda d: _edit_tensors(d, lambda t: t.update({Q + ".weight_packed": t[Q + ".weight_packed"][:, :1].clone()})),
                     rf"{Q}\.weight_packed does not hold a \[16, 16\] 4-bit weight"),
    "scale-shape": (lambda d: _edit_tensors(d, lambda t: t.update({Q + ".weight_scale": t[Q + ".weight_scale"][:3].clone()})),
                    rf"{Q}\.weight_scale is float32 \[3, 1\]; strategy 'channel'"),
    "truncated-file": (_truncate, r"could not read .*model\.safetensors"),
    "asymmetric": (lambda d: _edit_config(d, lambda c: _weights(c).update(symmetric=False)), r"asymmetric weights"),
    "float8": (lambda d: _edit_config(d, lambda c: _weights(c).update(type="float", num_bits=8)), r"type 'float'"),
    "3-bit": (lambda d: _edit_config(d, lambda c: _weights(c).update(num_bits=3)), r"num_bits 3.*\(2, 4, 8\)"),
    "naive-format": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(format="naive-quantized")),
                     r"format 'naive-quantized'.*'pack-quantized'"),
    "gptq": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(quant_method="gptq")),
             r"quant_method 'gptq'"),
    "activations": (lambda d: _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True})),
        r"input_activations are quantized.*ignore_activations=True"),
    "float-checkpoint": (lambda d: _edit_config(d, lambda c: c.pop("quantization_config")),
                         r"no quantization_config.*from_pretrained"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_name_the_problem(bert_dir, case, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(bert_dir[0], d)
    corrupt, match = LOAD_ERRORS[case]
    corrupt(d)
    with pytest.raises(ValueError, match=match):
        CT.load_compressed_tensors(d, head="classification")


def test_ignore_activations_loads_the_weights_and_warns(bert_dir, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(bert_dir[0], d)
    LOAD_ERRORS["activations"][0](d)
    with pytest.warns(UserWarning, match="activation / KV-cache quantization .* ignored"):
        loaded = CT.load_compressed_tensors(d, head="classification", ignore_activations=True)
    b = ids_for("bert")
    np.testing.assert_array_equal(run(loaded, b), run(bert_dir[1], b))
