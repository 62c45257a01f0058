"""Quantization reads the model family (`efficient_nlp.models.family`), not BERT paths.

On BERT the family-driven transforms find exactly what the former BERT-specific rules found
(those rules are inlined below as the reference); on tiny RoBERTa and DistilBERT models the
whole pipeline runs: fake quantization, the int8 model, the packed round trip, REM, MREM-S and
the MREM-P module slices.
"""
import re

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, quant
from efficient_nlp.models import family as F
from efficient_nlp.quant import adaptive, mrem, ptq, sharpness
from efficient_nlp.quant.mrem_parallel import module_slice
from efficient_nlp.quant.spec import resolve

import _tiny  # tests/_tiny.py

V, T = 50, 8
FAMILIES = ("bert", "roberta", "distilbert")
CLASSES = (models.BertForSequenceClassification, models.BertForMaskedLM, models.BertModel)


def tiny(model_type="bert", layers=2, cls=models.BertForSequenceClassification, seed=0, noise=0.05):
    """A tiny dropout-free model of ``model_type`` with ``noise`` * N(0, 1) added to its weights."""
    extra = {"roberta": dict(pad_token_id=1, type_vocab_size=1), "distilbert": dict(type_vocab_size=0)}
    cfg = models.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=24, num_labels=3, max_position_embeddings=40,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, model_type=model_type,
                            **extra.get(model_type, {}))
    model = cls(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + noise * jax.random.normal(next(keys), x.shape), params))
    return model


def batch(b=4, seed=0):
    return _tiny.token_batch(b, T, V, seed)


@nnx.jit
def logits(model, b):
    return F.forward(model, b).logits


# ----------------------------------------------------------------------------- the former BERT rules
def regex_sites(model) -> dict:
    """`quant.find_sites`'s site roles as the BERT-specific rules gave them."""
    unsigned = re.compile(r"(^|\.)ffn\.output$")
    sites = {}
    for path, mod in nnx.iter_modules(model):
        name = ".".join(map(str, path))
        if isinstance(mod, nnx.Linear):
            sites[name] = "weight"
            sites[name + ".input"] = "activation_unsigned" if unsigned.search(name) else "activation"
        elif isinstance(mod, nnx.Embed):
            sites[name] = "embedding"
        elif hasattr(mod, "matmul_quant"):
            for part in ("q", "k", "v"):
                sites[f"{name}.{part}"] = "activation"
            sites[name + ".probs"] = "activation_unsigned"
    return sites


def regex_part(site):
    """`adaptive.site_part` as the BERT-specific regex gave it."""
    part_of = {"attention.query": "qk", "attention.key": "qk", "attention.value": "v", "attention.output": "o",
               "ffn.intermediate": "ffn_in", "ffn.output": "ffn_out"}
    m = re.search(r"(?:^|\.)layers\.(\d+)\.(attention\.(?:query|key|value|output)|ffn\.(?:intermediate|output))$",
                  site)
    return (None, None) if m is None else (part_of[m.group(2)], int(m.group(1)))


def bert_prefixes(mod):
    """`mrem.Module.prefixes` of a BERT sequence classifier as the BERT-specific code gave them."""
    out = tuple(f"bert.encoder.layers.{i}." for i in range(mod.start, mod.stop))
    if mod.first:
        out += ("bert.embeddings.",)
    if mod.last:
        out += ("bert.pooler.", "classifier.")
    return out


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_sites_roles_and_quantizers_are_those_of_the_bert_rules(model_type, cls):
    """Same sites, in the same order, with the same roles, quantizers and reasons; the encoder
    families share BERT's module names, so the former rules are the reference for all three."""
    model = tiny(model_type, layers=3, cls=cls)
    _, sites = quant.find_sites(model)
    assert list(sites.items()) == list(regex_sites(model).items())
    unsigned = {s for s, role in sites.items() if role == "activation_unsigned" and s.endswith(".input")}
    assert unsigned == {f"{s.path}.input" for s in F.sites(model, roles=("ffn_out",))}
    for spec in (quant.make_spec(2, 2, 8), quant.make_spec(4, 8, 8, activation_method="lsq",
                                                           rules=[(r"attention\.query$", {"bits": 8})])):
        _, report = quant.quantize_model(model, spec)
        chosen = resolve(spec, regex_sites(model))
        expected = [(s, "float" if q is None else q.name, why) for s, (q, why) in chosen.items()]
        assert report.rows == expected
    names = list(sites) + [s.path for s in F.sites(model)]
    assert [adaptive.site_part(s) for s in names] == [regex_part(s) for s in names]
    assert sorted(sharpness.layer_sites(model)) == sorted(s for s in sites if regex_part(s)[0] is not None)


@pytest.mark.parametrize("layers,n", [(1, 1), (2, 2), (5, 2), (6, 4), (7, 3)])
def test_mrem_partition_prefixes_are_those_of_the_bert_code(layers, n):
    model = nnx.eval_shape(lambda: tiny(layers=layers, noise=0.0))
    for mod in mrem.modules(layers, n):
        assert mod.prefixes(model) == bert_prefixes(mod)
    roberta = nnx.eval_shape(lambda: tiny("roberta", layers=layers, noise=0.0))
    first, last = mrem.modules(layers, n)[0], mrem.modules(layers, n)[-1]
    assert "roberta.embeddings." in first.prefixes(roberta)
    assert last.prefixes(roberta)[-2:] == ("pre_classifier.", "classifier.")


def test_models_without_a_family_fail_clearly_in_reconstruction():
    class Plain(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(0))])

    model = Plain()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))   # roles unknown: still quantized
    calib = batch()
    with pytest.raises(F.FamilyError, match="no family describes it"):
        ptq.rem(qmodel, model, calib, steps=1, log=None)
    with pytest.raises(F.FamilyError, match="no family describes it"):
        mrem.mrem_s(qmodel, model, calib, num_modules=1, steps=1, log=None)


# ----------------------------------------------------------------------------- other families
@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_integer_model_and_packed_round_trip(model_type, tmp_path):
    model, b = tiny(model_type), batch(8)
    spec = quant.make_spec(4, 4, 8, activation_method="lsq")
    qmodel, report = quant.quantize_model(model, spec)
    quant.calibrate(qmodel, b)
    r = {site: q for site, q, _ in report.rows}
    ffn_out, query = F.site_path(model, 0, "ffn_out"), F.site_path(model, 0, "q")
    assert r[f"{ffn_out}.input"] == "lsq8u" and r[f"{query}.input"] == "lsq8"
    assert r[f"{F.attention_path(model, 1)}.probs"] == "lsq8u"
    assert r["pre_classifier"] == "uniform4/ch" and r["classifier"] == "float"

    imodel, ireport = quant.to_integer_model(qmodel)
    assert len(ireport.integer_sites) == 2 * 7 + 1      # 6 Linears + attention per layer, pre_classifier
    assert isinstance(F.get_module(imodel, F.attention_path(imodel, 1)).matmul_quant, quant.IntAttention)
    fake, integer = np.asarray(logits(qmodel, b)), np.asarray(logits(imodel, b))
    np.testing.assert_allclose(integer, fake, rtol=1e-4, atol=1e-5 * np.abs(fake).max())
    np.testing.assert_array_equal(integer.argmax(-1), fake.argmax(-1))

    artifact = quant.export_packed(qmodel)
    assert artifact["manifest"]["config"]["model_type"] == model_type
    quant.save_packed(artifact, tmp_path)
    loaded = quant.load_packed(tmp_path)
    for k, a in artifact["tensors"].items():
        np.testing.assert_array_equal(loaded["tensors"][k], a, err_msg=k)
    template, _ = quant.quantize_model(tiny(model_type, seed=7), spec)
    restored = quant.restore(loaded, template)
    np.testing.assert_allclose(logits(restored, b), fake, rtol=1e-6, atol=1e-7)


def calibration(n=24, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, V, (n, t)).astype(np.int32)
    mask = (np.arange(t)[None] < rng.integers(4, t + 1, (n, 1))).astype(np.int32)
    return dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=np.zeros_like(ids))


def quantized_lsq(model, calib, bits=(2, 2, 8)):
    qmodel, _ = quant.quantize_model(model, quant.make_spec(*bits, activation_method="lsq"))
    quant.calibrate(qmodel, {k: v[:16] for k, v in calib.items()})
    return qmodel


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_rem_reduces_every_matmul_error(model_type):
    teacher, calib = tiny(model_type, layers=1), calibration()
    qmodel = quantized_lsq(teacher, calib)
    out, report, info = ptq.rem(qmodel, teacher, calib, steps=30, learning_rate=1e-4, token_batch_size=64,
                                log=None)
    assert [r["site"] for r in report] == [s.path for s in F.sites(teacher)] + ["pre_classifier"]
    assert report[-1]["tokens"] == len(calib["input_ids"]) and report[-1]["layer"] == 1   # one row per example
    for r in report:
        assert r["after"] < r["before"], r
    assert ptq.layer_errors(out, teacher, calib)[0] != ptq.layer_errors(qmodel, teacher, calib)[0]


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_mrem_s_trains_each_module_inside_its_prefixes(model_type):
    teacher, calib = tiny(model_type), calibration()
    qmodel = quantized_lsq(teacher, calib)
    before = {ptq.dotted(k): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(qmodel))}
    out, report, info = mrem.mrem_s(qmodel, teacher, calib, num_modules=2, steps=20, batch_size=8, log=None)
    assert [r["layers"] for r in report] == [[0, 1], [1, 2]] and info["seconds"] > 0
    assert report[-1]["loss_after"] < report[-1]["loss_before"]
    changed = {k for k, v in nnx.to_flat_state(nnx.state(out)) if not np.array_equal(v, before[ptq.dotted(k)])}
    changed = {ptq.dotted(k) for k in changed}
    mods = mrem.modules(2, 2)
    inside = {n[len("q."):] for n in ptq.trainable_names(qmodel, mods[0].prefixes(qmodel) + mods[1].prefixes(qmodel),
                                                         root="q")}
    assert changed and changed <= inside
    assert any(k.startswith("pre_classifier.") for k in changed)
    assert any(k.startswith(f"{model_type}.encoder.layers.0.") for k in changed)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_mrem_p_module_slice_runs_exactly_like_the_full_model(model_type):
    teacher, calib = tiny(model_type, layers=3), calibration(n=8)
    qmodel = quantized_lsq(teacher, calib, (4, 4, 8))
    b = {k: jax.numpy.asarray(v) for k, v in calib.items()}
    h = F.embed(teacher, b)
    for mod in mrem.modules(3, 2):
        sub, local = module_slice(qmodel, mod)
        assert F.num_layers(sub) == mod.stop - mod.start
        assert (sub.backbone.embeddings is None) != mod.first and (sub.classifier is None) != mod.last
        full, part = mrem.module_forward(qmodel, mod, b, h), mrem.module_forward(sub, local, b, h)
        assert full.keys() == part.keys() and ("logits" in full) == mod.last
        for a, c in zip(jax.tree.leaves(full), jax.tree.leaves(part)):
            np.testing.assert_array_equal(a, c)
        h = full["out"]
