"""LoRA, bottleneck adapters, merging and adapter files (efficient_nlp.peft) on tiny BERT and Llama:
exact equality with the base at initialisation, merged == unmerged, frozen bases that stay
bit-identical through training, optimizer state on the trainable leaves only, file round trips,
the HF PEFT directory layout (and, when ``peft`` is installed, its logits in transformers), and
the errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from _tiny import lm_batch, tiny_bert, tiny_decoder, token_batch
from efficient_nlp import lowrank, models, peft, quant, train, tree
from efficient_nlp.models import family as F
from efficient_nlp.train.step import init_state

BERT_BATCH = {**token_batch(2, 8, 50), "labels": np.array([0, 2], np.int32)}
LM_BATCH = lm_batch(2, 8, 61)


def eager_logits(model, batch):
    """Logits without jit: different programs can fuse differently, eager ops compare exactly."""
    return np.asarray(F.forward(model, batch).logits)


def randomize(model, seed=0, scale=0.2):
    """Every LoRA / adapter parameter set to scale * N(0, 1) (B = 0 would hide every bug)."""
    state = nnx.state(model, peft.PeftParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape), state))
    return model


def params_by_path(model, filter_=nnx.Param):
    return {".".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(model, filter_))}


def cls_loss(model, batch, rngs):
    out = F.forward(model, batch, deterministic=False, rngs=rngs).logits
    return optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"]).mean(), None


def lm_loss(model, batch, rngs):
    out = F.forward(model, batch).logits[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["input_ids"][:, 1:])
    mask = batch["attention_mask"][:, 1:]
    return jnp.sum(ce * mask) / jnp.sum(mask), None


ADAM = optax.adam(1e-2)


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_starts_equal_to_the_base_and_reports_its_parameters(kind):
    model, batch = (tiny_bert(), BERT_BATCH) if kind == "bert" else (tiny_decoder("llama"), LM_BATCH)
    lora, report = peft.add_lora(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(eager_logits(lora, batch), eager_logits(model, batch))
    sites = F.sites(model, ("q", "v"))
    assert report.targets == tuple(s.path for s in sites)
    lora_size = sum(4 * sum(peft.lora.features(F.get_module(model, s.path), s.path)) for s in sites)
    head_size = sum(np.size(v) for path, v in params_by_path(model).items()
                    if any(path.startswith(h + ".") for h in F.head_paths(model)))
    assert report.trainable_params == lora_size + head_size
    assert report.total_params == sum(np.size(v) for v in params_by_path(model).values()) + lora_size
    assert f"{report.trainable_params:,} trainable" in str(report) and "LoRA r=4 alpha=8" in str(report)
    assert isinstance(F.get_module(lora, sites[0].path).base, nnx.Linear)
    assert not isinstance(F.get_module(model, sites[0].path), peft.LoraLinear)  # the input is untouched


def test_lora_forward_matches_its_equation():
    model = tiny_bert()
    lora = randomize(peft.add_lora(model, rank=3, alpha=6.0)[0])
    mod = F.get_module(lora, F.site_path(lora, 0, "q"))
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    base = x @ np.asarray(mod.base.kernel[...]) + np.asarray(mod.base.bias[...])
    want = base + 2.0 * x @ np.asarray(mod.lora_a[...]) @ np.asarray(mod.lora_b[...])
    np.testing.assert_allclose(mod(x), want, rtol=1e-5, atol=1e-6)
    assert mod.lora_a[...].shape == (16, 3) and mod.lora_b[...].shape == (3, 16)


def test_targets_by_rules_and_roles():
    model = tiny_bert()
    path = F.site_path(model, 1, "ffn_out")
    lora, report = peft.add_lora(model, roles=("k",), rules=[r"layers\.1\.ffn\.output$"], rank=2)
    assert report.targets == (F.site_path(model, 0, "k"), F.site_path(model, 1, "k"), path)
    only_rules, report = peft.add_lora(model, roles=(), rules=r"^classifier$", rank=2)
    assert report.targets == ("classifier",)
    assert isinstance(F.get_module(only_rules, "classifier"), peft.LoraLinear)


def test_lora_target_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="does not describe.*'ffn_in'"):
        peft.add_lora(model, roles=("ffn_gate",))
    with pytest.raises(ValueError, match=r"unknown role\(s\) \['query'\].*'q'"):
        peft.add_lora(model, roles=("query",))
    with pytest.raises(tree.RuleError, match="matches no leaf.*bert.encoder.layers.0.attention.query"):
        peft.add_lora(model, roles=(), rules=[r"attention\.qkv$"])
    with pytest.raises(ValueError, match=r"layers.0.attention.query: LoRA rank must be an int in \[1, 16\]"):
        peft.add_lora(model, rank=17)
    with pytest.raises(ValueError, match=r"classifier: LoRA rank must be an int in \[1, 3\]"):
        peft.add_lora(model, roles=(), rules=["^classifier$"], rank=4)
    with pytest.raises(ValueError, match="no targets"):
        peft.add_lora(model, roles=())
    lora, _ = peft.add_lora(model, rank=2)
    with pytest.raises(peft.PeftError, match="layers.0.attention.query already holds a lora"):
        peft.add_lora(lora, rank=2)


def test_rules_alone_work_on_a_model_without_family():
    class Mlp(nnx.Module):
        def __init__(self):
            self.fc1, self.fc2 = nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.Linear(5, 4, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    mlp = Mlp()
    lora, report = peft.add_lora(mlp, roles=(), rules=["fc2"], rank=2)
    assert report.targets == ("fc2",) and report.trainable_params == 2 * (5 + 4)
    x = np.ones((3, 6), np.float32)
    np.testing.assert_array_equal(lora(x), mlp(x))
    with pytest.raises(ValueError, match="roles need a model family"):
        peft.add_lora(mlp)
    with pytest.raises(ValueError, match="pass head=False"):
        peft.trainable(lora)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_merge_equals_the_unmerged_model_and_unmerge_restores_the_base(kind):
    model, batch = (tiny_bert(), BERT_BATCH) if kind == "bert" else (tiny_decoder("llama"), LM_BATCH)
    lora = randomize(peft.add_lora(model, roles=("q", "v", "ffn_out"), rank=4)[0])
    merged = peft.merge(lora)
    assert not any(isinstance(m, peft.PeftWrapper) for _, m in nnx.iter_modules(merged))
    want = eager_logits(lora, batch)
    assert np.max(np.abs(eager_logits(model, batch) - want)) > 1e-2  # the LoRA changes the outputs
    np.testing.assert_allclose(eager_logits(merged, batch), want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    assert set(params_by_path(merged)) == set(params_by_path(model))

    back = peft.unmerge(merged, peft.adapter_state(lora))
    for path, value in params_by_path(back).items():
        np.testing.assert_allclose(value, params_by_path(lora)[path], atol=1e-6, err_msg=path)
    np.testing.assert_allclose(eager_logits(back, batch), want, rtol=1e-5, atol=1e-6)


def test_merge_into_a_factorised_linear_is_exact_and_unmerges():
    model = lowrank.factorize(tiny_bert(), roles=("q", "v"), rank=3)[0]
    lora = randomize(peft.add_lora(model, rank=2)[0])
    assert isinstance(F.get_module(lora, F.site_path(lora, 0, "q")).base, lowrank.LowRankLinear)
    merged = peft.merge(lora)
    site = F.get_module(merged, F.site_path(merged, 0, "q"))
    assert isinstance(site, lowrank.LowRankLinear) and site.rank == 5
    want = eager_logits(lora, BERT_BATCH)
    np.testing.assert_allclose(eager_logits(merged, BERT_BATCH), want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    back = peft.unmerge(merged, peft.adapter_state(lora))
    for path, value in params_by_path(back).items():
        np.testing.assert_array_equal(value, params_by_path(lora)[path], err_msg=path)


def test_merge_refuses_quantized_bases_until_dequantized_and_refuses_adapters():
    model = tiny_bert()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(4, 32, 32))
    lora = randomize(peft.add_lora(qmodel, rank=2)[0])
    with pytest.raises(peft.PeftError, match="base is a QuantLinear.*quantization grid.*dequantize_base"):
        peft.merge(lora)
    floated = peft.dequantize_base(lora)
    assert type(F.get_module(floated, F.site_path(floated, 0, "q")).base) is nnx.Linear
    want = eager_logits(lora, BERT_BATCH)
    np.testing.assert_allclose(eager_logits(floated, BERT_BATCH), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager_logits(peft.merge(floated), BERT_BATCH), want, rtol=1e-5, atol=1e-5)

    a8, _ = quant.quantize_model(model, quant.make_spec(4, 32, 8))
    with pytest.raises(peft.PeftError, match="quantizes its inputs too"):
        peft.dequantize_base(peft.add_lora(a8, rank=2)[0])
    adapted, _ = peft.add_adapters(model, size=4)
    with pytest.raises(peft.PeftError, match="holds a adapter.*nonlinear.*cannot be folded"):
        peft.merge(adapted)


def test_lora_over_a_packed_4bit_base_trains_and_merges_after_dequantizing():
    packed, _ = peft.qlora.quantize_base(tiny_decoder("llama"), block_size=16)
    lora, _ = peft.add_lora(packed, rank=4)
    assert isinstance(F.get_module(lora, F.site_path(lora, 0, "q")).base, peft.qlora.PackedLinear)
    filt = peft.trainable(lora, head=False)
    trained, history = train.run(lora, lm_loss, ADAM, [LM_BATCH] * 3, steps=3, trainable=filt)
    assert history[-1]["loss"] < history[0]["loss"]
    _check_trained(lora, trained, filt, ())
    old, new = nnx.state(lora, peft.qlora.QuantizedBase), nnx.state(trained, peft.qlora.QuantizedBase)
    assert jax.tree.leaves(old)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    with pytest.raises(peft.PeftError, match="PackedLinear, not a float nnx.Linear"):
        peft.merge(trained)
    want = eager_logits(trained, LM_BATCH)
    merged = peft.merge(peft.dequantize_base(trained))
    np.testing.assert_allclose(eager_logits(merged, LM_BATCH), want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def _check_trained(before, after, filt, changed_prefixes):
    """Every parameter outside ``filt`` bit-identical; every trainable one changed."""
    old, new, chosen = params_by_path(before), params_by_path(after), params_by_path(before, filt)
    assert set(old) == set(new)
    for path in old:
        if path in chosen:
            assert not np.array_equal(old[path], new[path]), f"{path} did not train"
            assert path.endswith(("lora_a", "lora_b", "down", "down_bias", "up", "up_bias")) or \
                path.startswith(changed_prefixes), path
        else:
            np.testing.assert_array_equal(old[path], new[path], err_msg=path)


def test_training_changes_only_lora_and_head_and_optimizer_state_holds_only_them():
    lora, _ = peft.add_lora(tiny_bert(), rank=4)
    filt = peft.trainable(lora)
    _, state = init_state(lora, ADAM, filt)
    trainable_leaves = params_by_path(lora, filt)
    assert len(jax.tree.leaves(state.params)) == len(trainable_leaves) == 4 * 2 + 4  # LoRA A, B; pooler, classifier
    size = sum(np.size(v) for v in trainable_leaves.values())
    assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) == 2 * size + 1  # Adam's mu, nu, count
    trained, history = train.run(lora, cls_loss, ADAM, [BERT_BATCH] * 3, steps=3, trainable=filt)
    assert history[-1]["loss"] < history[0]["loss"]
    _check_trained(lora, trained, filt, ("bert.pooler", "classifier"))


def test_lora_on_a_causal_lm_without_head_trains_only_lora():
    lora, _ = peft.add_lora(tiny_decoder("llama"), roles=("q", "k", "v", "o"), rank=4)
    filt = peft.trainable(lora, head=False)
    assert all(p.endswith(("lora_a", "lora_b")) for p in params_by_path(lora, filt))
    trained, history = train.run(lora, lm_loss, ADAM, [LM_BATCH] * 3, steps=3, trainable=filt)
    assert history[-1]["loss"] < history[0]["loss"]
    _check_trained(lora, trained, filt, ())


def test_lora_over_a_fake_quantized_model_trains_with_its_base_fixed():
    qmodel, _ = quant.quantize_model(tiny_bert(), quant.make_spec(4, 32, 32, weight_method="lsq"))
    lora, _ = peft.add_lora(qmodel, rank=4)
    mod = F.get_module(lora, F.site_path(lora, 0, "q"))
    assert isinstance(mod.base, quant.modules.QuantLinear)
    np.testing.assert_array_equal(eager_logits(lora, BERT_BATCH), eager_logits(qmodel, BERT_BATCH))
    filt = peft.trainable(lora)
    trained, history = train.run(lora, cls_loss, ADAM, [BERT_BATCH] * 3, steps=3, trainable=filt)
    assert history[-1]["loss"] < history[0]["loss"]
    _check_trained(lora, trained, filt, ("bert.pooler", "classifier"))
    assert any(p.endswith("weight_quant.step") for p in params_by_path(lora))  # LSQ steps: frozen with the base


def test_lora_dropout_drops_in_training_mode_only():
    model = tiny_bert()
    lora = randomize(peft.add_lora(model, rank=4, dropout=0.5)[0])
    mod = F.get_module(lora, F.site_path(lora, 0, "q"))
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    first, second = np.asarray(mod(x)), np.asarray(mod(x))
    assert not np.allclose(first, second)  # a fresh mask per call
    base = np.asarray(mod.base(x))
    delta = first - base
    full = mod.scale * x @ np.asarray(mod.lora_a[...]) @ np.asarray(mod.lora_b[...])
    assert mod.scale == 16.0 / 4
    assert np.max(np.abs(delta - full)) > 1e-3
    lora.eval()
    np.testing.assert_allclose(mod(x), base + full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eager_logits(lora, BERT_BATCH), eager_logits(peft.merge(lora), BERT_BATCH),
                               rtol=1e-5, atol=1e-5)
    lora.train()
    trained, _ = train.run(lora, cls_loss, ADAM, [BERT_BATCH] * 2, steps=2, trainable=peft.trainable(lora))
    assert np.isfinite(eager_logits(trained, BERT_BATCH)).all()


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_adapters_start_equal_to_the_base_and_train_alone(kind):
    model, batch, loss = ((tiny_bert(), BERT_BATCH, cls_loss) if kind == "bert"
                          else (tiny_decoder("llama"), LM_BATCH, lm_loss))
    adapted, report = peft.add_adapters(model, size=4)
    assert report.targets == tuple(s.path for s in F.sites(model, ("o", "ffn_out")))
    np.testing.assert_array_equal(eager_logits(adapted, batch), eager_logits(model, batch))
    mod = F.get_module(adapted, report.targets[0])
    assert mod.down[...].shape == (16, 4) and mod.up[...].shape == (4, 16)
    filt = peft.trainable(adapted, head=kind == "bert")
    trained, history = train.run(adapted, loss, ADAM, [batch] * 3, steps=3, trainable=filt)
    assert history[-1]["loss"] < history[0]["loss"]
    _check_trained(adapted, trained, filt, ("bert.pooler", "classifier"))


def test_adapter_forward_matches_its_equation():
    adapted = randomize(peft.add_adapters(tiny_bert(), size=3, activation="relu")[0])
    mod = F.get_module(adapted, F.site_path(adapted, 0, "ffn_out"))
    x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
    y = x @ np.asarray(mod.base.kernel[...]) + np.asarray(mod.base.bias[...])
    h = np.maximum(y @ np.asarray(mod.down[...]) + np.asarray(mod.down_bias[...]), 0)
    np.testing.assert_allclose(mod(x), y + h @ np.asarray(mod.up[...]) + np.asarray(mod.up_bias[...]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unsupported hidden_act 'tanh'"):
        peft.add_adapters(tiny_bert(), activation="tanh")


# ----------------------------------------------------------------------------- files
def test_adapter_file_round_trip(tmp_path):
    model = tiny_bert()
    lora = randomize(peft.add_lora(model, rank=4)[0])
    randomize(lora, seed=1)
    path = peft.save_adapter(lora, tmp_path / "a.safetensors")
    saved = load_file(path)
    assert sorted(saved) == sorted(f"{s.path}.{n}" for s in F.sites(model, ("q", "v")) for n in ("lora_a", "lora_b"))
    loaded = peft.load_adapter(model, path)
    np.testing.assert_array_equal(eager_logits(loaded, BERT_BATCH), eager_logits(lora, BERT_BATCH))

    trained, _ = train.run(lora, cls_loss, ADAM, [BERT_BATCH] * 2, steps=2, trainable=peft.trainable(lora))
    peft.save_adapter(trained, tmp_path / "h.safetensors", head=True)
    assert "classifier.kernel" in load_file(tmp_path / "h.safetensors")
    loaded = peft.load_adapter(model, tmp_path / "h.safetensors")
    np.testing.assert_array_equal(eager_logits(loaded, BERT_BATCH), eager_logits(trained, BERT_BATCH))

    adapted = randomize(peft.add_adapters(model, size=4)[0])
    peft.save_adapter(adapted, tmp_path / "ad.safetensors")
    loaded = peft.load_adapter(model, tmp_path / "ad.safetensors")
    np.testing.assert_array_equal(eager_logits(loaded, BERT_BATCH), eager_logits(adapted, BERT_BATCH))


def test_adapter_load_errors_name_the_site(tmp_path):
    lora = peft.add_lora(tiny_bert(), rank=4)[0]
    path = peft.save_adapter(lora, tmp_path / "a.safetensors")
    wider = tiny_bert(hidden=32, heads=2)
    with pytest.raises(peft.PeftError, match=r"layers.0.attention.query: .*\(16, 16\), this model's is \(32, 32\)"):
        peft.load_adapter(wider, path)
    with pytest.raises(peft.PeftError, match=r"targets bert.encoder.layers.1.attention.query, which this model lacks"):
        peft.load_adapter(tiny_bert(layers=1), path)
    with pytest.raises(peft.PeftError, match="already holds a lora"):
        peft.load_adapter(lora, path)
    with pytest.raises(peft.PeftError, match="holds no LoRA or adapter"):
        peft.save_adapter(tiny_bert(), tmp_path / "none.safetensors")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_dir_layout_and_round_trip(tmp_path, kind):
    model, batch = (tiny_bert(), BERT_BATCH) if kind == "bert" else (tiny_decoder("llama"), LM_BATCH)
    lora = randomize(peft.add_lora(model, rank=4, alpha=8.0, dropout=0.1)[0])
    out = peft.save_peft_dir(lora, tmp_path, base_model_name_or_path="tiny")
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    if kind == "bert":
        assert config["target_modules"] == ["query", "value"] and config["task_type"] == "SEQ_CLS"
        assert config["modules_to_save"] == ["bert.pooler.dense", "classifier"]
        a = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight"]
        b = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
        np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"],
                                      np.asarray(lora.classifier.kernel[...]).T)
    else:
        assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"
        assert config["modules_to_save"] == ["model.norm", "lm_head"]
        a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
        b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    site = F.get_module(lora, F.site_path(lora, 1, "v"))
    np.testing.assert_array_equal(a, np.asarray(site.lora_a[...]).T)  # [r, d_in]
    np.testing.assert_array_equal(b, np.asarray(site.lora_b[...]).T)  # [d_out, r]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"],
            config["peft_type"], config["base_model_name_or_path"]) == (4, 8.0, 0.1, "none", "LORA", "tiny")
    loaded = peft.load_peft_dir(model, out)
    lora.eval()
    loaded.eval()
    np.testing.assert_array_equal(eager_logits(loaded, batch), eager_logits(lora, batch))


def test_peft_dir_errors(tmp_path):
    gpt2 = peft.add_lora(tiny_decoder("gpt2"), rank=2)[0]
    with pytest.raises(peft.PeftError, match=r"layers.0.attention.query is one part of the fused HF tensor "
                                              r"transformer.h.0.attn.c_attn.weight"):
        peft.save_peft_dir(gpt2, tmp_path / "g")
    adapted = peft.add_adapters(tiny_bert(), size=2)[0]
    with pytest.raises(peft.PeftError, match="holds a adapter; HF PEFT's LoRA directory holds LoRA only"):
        peft.save_peft_dir(adapted, tmp_path / "a")
    lora = peft.add_lora(tiny_bert(), rank=2)[0]
    out = peft.save_peft_dir(lora, tmp_path / "d")
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    json.dump({**config, "use_dora": True}, open(os.path.join(out, "adapter_config.json"), "w"))
    with pytest.raises(peft.PeftError, match=r"unsupported LoRA options \['use_dora'\]"):
        peft.load_peft_dir(tiny_bert(), out)
    json.dump(config, open(os.path.join(out, "adapter_config.json"), "w"))
    with pytest.raises(peft.PeftError, match=r"\(16, 16\), this model's is \(32, 32\)"):
        peft.load_peft_dir(tiny_bert(hidden=32), out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_hf_peft_loads_our_directory_with_the_same_logits(tmp_path, kind):
    pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers
    from peft import PeftModel

    model, batch = (tiny_bert(), BERT_BATCH) if kind == "bert" else (tiny_decoder("llama"), LM_BATCH)
    lora = randomize(peft.add_lora(model, roles=("q", "v", "ffn_out"), rank=4, alpha=8.0)[0])
    randomize(lora, seed=1)
    nnx.update(lora, jax.tree.map(lambda x: x + 0.1, nnx.state(lora, peft.trainable(lora))))  # a trained head
    models.save_hf_checkpoint(model, tmp_path / "base")
    peft.save_peft_dir(lora, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    auto = (transformers.AutoModelForSequenceClassification if kind == "bert"
            else transformers.AutoModelForCausalLM)
    hf = PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        inputs = {k: torch.tensor(np.asarray(v, np.int64)) for k, v in batch.items() if k != "labels"}
        theirs = hf(**inputs).logits.numpy()
    ours = eager_logits(lora, batch)
    mask = batch["attention_mask"].astype(bool) if kind == "llama" else slice(None)
    np.testing.assert_allclose(theirs[mask], ours[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_directory_written_by_hf_peft_loads_with_the_same_logits(tmp_path):
    hf_peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers

    model = tiny_bert()
    models.save_hf_checkpoint(model, tmp_path / "base")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    hf = hf_peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.requires_grad:  # LoRA factors and the classifier copy PEFT trains
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        inputs = {k: torch.tensor(np.asarray(v, np.int64)) for k, v in BERT_BATCH.items() if k != "labels"}
        theirs = hf.eval()(**inputs).logits.numpy()
    assert np.max(np.abs(theirs - eager_logits(model, BERT_BATCH))) > 1e-2
    loaded = peft.load_peft_dir(model, tmp_path / "adapter")
    assert sorted(peft.lora.wrappers(loaded)) == sorted(s.path for s in F.sites(model, ("q", "v")))
    np.testing.assert_allclose(eager_logits(loaded, BERT_BATCH), theirs, rtol=1e-4, atol=1e-4)


def test_lora_on_a_physically_pruned_model_follows_its_smaller_widths():
    """Composes with structured pruning: after heads and FFN neurons are removed, LoRA's factors
    take the pruned Linears' widths and the start still equals the pruned model."""
    model = tiny_bert()
    small = F.resized(model, heads=[[1], [0]], neurons=[list(range(0, 24, 2)), list(range(10))])
    lmodel, _ = peft.add_lora(small, roles=("q", "ffn_in", "ffn_out"), rank=2)
    batch = token_batch(2, 8, 50)
    np.testing.assert_array_equal(F.forward(lmodel, batch).logits, F.forward(small, batch).logits)
    q = F.get_module(lmodel, F.site_path(lmodel, 0, "q"))
    ffn_out = F.get_module(lmodel, F.site_path(lmodel, 1, "ffn_out"))
    assert q.lora_b.get_value().shape == (2, 8)          # one head of 8 kept
    assert ffn_out.lora_a.get_value().shape == (10, 2)   # 10 neurons kept


def test_predict_switches_lora_dropout_off_and_qlora_reports_every_weight():
    """Evaluation (`train.predict`) runs LoRA with its dropout off, whatever the module's mode;
    the report of LoRA on a packed base counts the packed weights as parameters."""
    model, report = peft.add_lora(tiny_bert(), dropout=0.5)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, peft.LoraLinear):
            module.lora_b.set_value(module.lora_b.get_value() + 1.0)
    arrays = {**token_batch(16, 8, 50), "labels": np.zeros(16, np.int32)}   # batches of 8: up to 8 devices
    first, second = train.predict(model, arrays, 8), train.predict(model, arrays, 8)
    np.testing.assert_array_equal(first, second)
    off = train.copy_model(model)
    off.eval()
    np.testing.assert_allclose(first, F.forward(off, arrays).logits, atol=1e-5)
    packed, _ = peft.qlora.quantize_base(tiny_bert(), block_size=8)
    assert peft.add_lora(packed)[1].total_params == report.total_params
