"""The encoder families beyond BERT (RoBERTa / XLM-R, DistilBERT, ELECTRA, data2vec-text).

Parity with ``transformers``' PyTorch models on tiny random checkpoints (hidden states of every
layer, pooler and logits, with padding), checkpoints written by `save_hf_checkpoint` that
``transformers`` reads with no missing / unexpected tensor, config translation both ways,
resized (physically pruned) models, and the errors for unknown families and missing roles.
"""
import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from efficient_nlp import models as M
from efficient_nlp.models import family as F

SIZES = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=24, max_position_embeddings=40)
#: Our config fields of a tiny model per family (RoBERTa: one token type, padding index 1).
OURS = {
    "roberta": dict(model_type="roberta", pad_token_id=1, type_vocab_size=1),
    "xlm-roberta": dict(model_type="roberta", pad_token_id=1, type_vocab_size=1, hf_model_type="xlm-roberta"),
    "distilbert": dict(model_type="distilbert", type_vocab_size=0),
    "electra": dict(model_type="electra", embedding_size=8),
    "data2vec-text": dict(model_type="data2vec_text", pad_token_id=1, type_vocab_size=1),
}
#: transformers class-name stem, padding id and whether the family has token types.
HF = {"roberta": ("Roberta", 1, False), "xlm-roberta": ("XLMRoberta", 1, False),
      "distilbert": ("DistilBert", 0, False), "electra": ("Electra", 0, True),
      "data2vec-text": ("Data2VecText", 1, False)}
KINDS = {"base": ("Model", None), "classification": ("ForSequenceClassification", "classification"),
         "mlm": ("ForMaskedLM", "mlm")}
AUTO = {"base": "AutoModel", "classification": "AutoModelForSequenceClassification",
        "mlm": "AutoModelForMaskedLM"}
OUR_CLASS = {"base": M.BertModel, "classification": M.BertForSequenceClassification, "mlm": M.BertForMaskedLM}


def _torch():
    torch = pytest.importorskip("torch", reason="parity with transformers needs torch")
    transformers = pytest.importorskip("transformers", reason="parity with transformers needs transformers")
    torch.manual_seed(0)
    return torch, transformers


def hf_config(transformers, name, **kw):
    """A tiny transformers config of family ``name``."""
    if name == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=24, max_position_embeddings=40, **kw)
    stem = HF[name][0]
    extra = {"electra": dict(embedding_size=8)}.get(name, dict(pad_token_id=1, type_vocab_size=1))
    return getattr(transformers, stem + "Config")(**SIZES, **extra, **kw)


def batch(name, seed=0):
    """ids / mask / token types with padding; padded positions hold the family's pad id."""
    pad, with_types = HF[name][1], HF[name][2]
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, size=(3, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad
    types = None
    if with_types:
        types = np.zeros_like(ids)
        types[0, 5:] = 1
    return ids, mask, types


def run_torch(model, torch, ids, mask, types):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    if types is not None:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw)


def maxabs(a, b):
    return float(np.abs(np.asarray(a) - b.detach().numpy()).max())


def params_np(model):
    return {k: np.asarray(v.get_value()) for k, v in M.named_params(model).items()}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(HF))
def test_parity_and_transformers_reads_our_save(name, kind, tmp_path):
    torch, transformers = _torch()
    suffix, head = KINDS[kind]
    theirs = getattr(transformers, HF[name][0] + suffix)(hf_config(transformers, name, num_labels=3)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = M.from_pretrained(tmp_path / "hf", head=head)
    assert type(ours) is OUR_CLASS[kind] and F.family_of(ours).name == OURS[name]["model_type"]

    ids, mask, types = batch(name)
    ref = run_torch(theirs, torch, ids, mask, types)
    out = ours(ids, mask, types, capture=("hidden_states",))
    states = out.intermediates["hidden_states"]
    assert len(states) == len(ref.hidden_states) == 3
    every = max(maxabs(a, b) for a, b in zip(states, ref.hidden_states))
    if kind == "base":
        last = maxabs(out.last_hidden_state, ref.last_hidden_state)
        assert (out.pooler_output is None) == (getattr(ref, "pooler_output", None) is None)
        pooled = maxabs(out.pooler_output, ref.pooler_output) if out.pooler_output is not None else 0.0
        print(f"{name} {kind}: hidden states {every:.1e}, last {last:.1e}, pooler {pooled:.1e}")
        assert last < 1e-4 and pooled < 1e-4
    else:
        last = maxabs(out.logits, ref.logits)
        print(f"{name} {kind}: hidden states {every:.1e}, logits {last:.1e}")
        assert last < 1e-4
    assert every < 1e-4

    # Our save: transformers' Auto class builds the same model with every tensor accounted for.
    M.save_hf_checkpoint(ours, tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_type"] == name and saved["architectures"] == [HF[name][0] + suffix]
    back, info = getattr(transformers, AUTO[kind]).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(back) is type(theirs)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    again = run_torch(back.eval(), torch, ids, mask, types)
    want, got = (ref.logits, again.logits) if kind != "base" else (ref.last_hidden_state, again.last_hidden_state)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    # ... and loads back into ours exactly.
    mine = M.from_pretrained(tmp_path / "ours", head=head)
    a, b = params_np(ours), params_np(mine)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert mine.config == ours.config


@pytest.mark.parametrize("name", list(HF))
def test_config_translation_both_ways(name, tmp_path):
    """Non-default activations, dropouts, eps and init range survive HF -> ours -> HF."""
    _, transformers = _torch()
    if name == "distilbert":
        kw = dict(activation="gelu_new", dropout=0.15, attention_dropout=0.05, seq_classif_dropout=0.3,
                  initializer_range=0.03, pad_token_id=2)
        ours_want = dict(hidden_act="gelu_new", hidden_dropout_prob=0.15, attention_probs_dropout_prob=0.05,
                         classifier_dropout=0.3, initializer_range=0.03, pad_token_id=2, layer_norm_eps=1e-12)
    else:
        kw = dict(hidden_act="gelu_new", hidden_dropout_prob=0.15, attention_probs_dropout_prob=0.05,
                  classifier_dropout=0.3, initializer_range=0.03, layer_norm_eps=1e-7)
        ours_want = {**kw}
    theirs = hf_config(transformers, name, num_labels=4, **kw)
    theirs.save_pretrained(tmp_path)
    cfg = M.BertConfig.from_pretrained(tmp_path)
    expect = {**SIZES, **OURS[name], **ours_want, "num_labels": 4}
    assert {k: getattr(cfg, k) for k in expect} == expect
    again = type(theirs).from_dict(cfg.to_hf_dict())
    names = [k for k in theirs.to_diff_dict() if k not in ("transformers_version", "architectures")]
    assert {k: getattr(again, k) for k in names} == {k: getattr(theirs, k) for k in names}
    assert M.BertConfig.from_dict(cfg.to_hf_dict()) == cfg


def tiny(name, cls=M.BertForSequenceClassification, **kw):
    return cls(M.BertConfig(**{**SIZES, **OURS[name], **kw}), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", list(OUR_CLASS))
@pytest.mark.parametrize("name", ["roberta", "distilbert", "electra"])
def test_resized_model_saves_and_loads_back(name, kind, tmp_path):
    model = tiny(name, OUR_CLASS[kind], num_hidden_layers=3)
    small = F.resized(model, layers=[0, 2], heads=[[1], [0, 1]], neurons=[[0, 3, 5], [7]])
    M.save_hf_checkpoint(small, tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["layer_num_attention_heads"] == [1, 2] and saved["layer_intermediate_sizes"] == [3, 1]
    back = M.from_pretrained(tmp_path, head=KINDS[kind][1])
    assert [F.head_layout(back, i).num_heads for i in range(2)] == [1, 2]
    assert [F.num_neurons(back, i) for i in range(2)] == [3, 1]
    a, b = params_np(small), params_np(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ids, mask, types = batch(name)
    x, y = small(ids, mask, types), back(ids, mask, types)
    np.testing.assert_array_equal(x.last_hidden_state, y.last_hidden_state)
    # A config that no longer describes the weights is refused before anything is written.
    small.config = model.config
    with pytest.raises(ValueError, match="differ from model.config"):
        M.save_hf_checkpoint(small, tmp_path / "bad")


@pytest.mark.parametrize("name", ["roberta", "distilbert", "electra"])
def test_family_description_runs_the_model(name):
    model = tiny(name)
    fam = F.family_of(model)
    assert model.backbone is getattr(model, name) and fam.name == name
    assert len(F.sites(model)) == 2 * 6
    site = F.sites(model)[-1]
    assert site.role == "ffn_out" and F.site_of(model, site.path + ".kernel") == site
    assert F.head_paths(model) == ("pre_classifier", "classifier")
    assert F.head_layout(model, 1) == F.HeadLayout(2, 2, 8)
    ids, mask, types = batch(name)
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    h, _ = F.run_layers(model, F.embed(model, b), mask)
    np.testing.assert_allclose(F.head(model, h), F.forward(model, b).logits, atol=1e-6)
    assert F.head_paths(tiny(name, M.BertModel)) == ((f"{name}.pooler",) if name == "roberta" else ())


def test_dropout_placement_follows_each_family():
    """DistilBERT has no dropout on the attention output (its FFN output has one)."""
    for name, rate in (("roberta", 0.1), ("electra", 0.1), ("distilbert", 0.0)):
        layer = F.layer_stack(tiny(name))[0]
        assert layer.attention.dropout.rate == rate and layer.ffn.dropout.rate == 0.1, name


def test_missing_tensor_names_the_hf_tensor(tmp_path):
    M.save_hf_checkpoint(tiny("roberta"), tmp_path)
    tensors = dict(load_file(tmp_path / "model.safetensors"))
    del tensors["roberta.encoder.layer.1.attention.self.key.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(M.CheckpointMismatchError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight"):
        M.from_pretrained(tmp_path, head="classification")


def test_unknown_model_type_names_the_supported_ones(tmp_path):
    M.save_hf_checkpoint(tiny("electra"), tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(M.FamilyError, match=r"model_type='falcon'.*supported.*'distilbert'.*'xlm-roberta'"):
        M.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="valid: .*'roberta'"):
        M.BertConfig(**SIZES, model_type="falcon")
    with pytest.raises(ValueError, match="decoder family.*DecoderConfig"):
        M.BertConfig(**SIZES, model_type="gpt2")


def test_a_family_without_a_role_says_which(monkeypatch):
    bert = F.get_family("bert")
    sites = {r: p for r, p in bert.layer_sites.items() if r != "ffn_out"}
    no_ffn_out = dataclasses.replace(bert, layer_sites=sites)
    model = tiny("roberta")
    monkeypatch.setitem(F._FAMILIES, "roberta", dataclasses.replace(no_ffn_out, name="roberta"))
    with pytest.raises(F.FamilyError, match=r"\['ffn_out'\].*'roberta'"):
        F.site_path(model, 0, "ffn_out")
    with pytest.raises(F.FamilyError, match=r"resizing a model needs the role\(s\) \['ffn_out'\]"):
        F.resized(model, layers=[0])
    assert [s.role for s in F.sites(model)][:5] == ["q", "k", "v", "o", "ffn_in"]
    with pytest.raises(F.FamilyError, match=r"gated FFN needs the role\(s\) \['ffn_gate'\]"):
        bert.require("q", "ffn_gate", what="gated FFN")
    with pytest.raises(F.FamilyError, match="unknown role"):
        dataclasses.replace(bert, layer_sites={**bert.layer_sites, "gate": "ffn.gate"})


def test_the_guide_shows_the_data2vec_family_file():
    """docs/extending.md's "A new model family" code is the shipped family file (docstring aside)."""
    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "extending.md").read_text()
    shown = re.search(r"## A new model family.*?^```py\n(.*?)^```", guide, re.S | re.M).group(1)
    source = (root / "efficient_nlp" / "models" / "families" / "data2vec_text.py").read_text()
    assert shown.strip() == source.split('"""\n', 1)[1].strip()
