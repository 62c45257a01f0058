"""Decoder families (GPT-2, Llama, Mistral, Qwen2): parity with transformers' PyTorch models on
random-weight checkpoints, HF round trips, the family description, and shrink == masked."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models
from efficient_nlp.models import family as F

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 64
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _hf_models():
    t = transformers
    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=40)),
        "llama-gqa-llama3": lambda: t.LlamaForCausalLM(t.LlamaConfig(
            **SMALL, num_key_value_heads=2, max_position_embeddings=64, rope_scaling=LLAMA3)),
        "llama-bias-linear-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(
            **SMALL, attention_bias=True, mlp_bias=True, rope_theta=500.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True)),
        "mistral-window": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=2,
                                                                         sliding_window=4)),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, build in _hf_models().items():
        hf = build().eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0.0, 0.2)
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = (hf, path)
    return out


IDS = np.random.default_rng(0).integers(0, V, (2, 12))


def _torch_logits(hf, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return hf(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("name", list(_hf_models()))
def test_logits_match_transformers(checkpoints, name):
    hf, path = checkpoints[name]
    model = models.from_pretrained(path)
    assert isinstance(model, models.DecoderForCausalLM)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS)).logits), _torch_logits(hf, IDS), atol=1e-4)
    # right padding: the valid tokens' logits are those of the unpadded sequence
    mask = np.ones_like(IDS)
    mask[1, 7:] = 0
    ours = np.asarray(model(jnp.asarray(IDS), jnp.asarray(mask)).logits)
    np.testing.assert_allclose(ours[1, :7], _torch_logits(hf, IDS[1:2, :7])[0], atol=1e-4)


def test_features_change_the_function(checkpoints):
    """The parity cases exercise what they claim: rope scaling and the sliding window matter."""
    _, path = checkpoints["llama-gqa-llama3"]
    model = models.from_pretrained(path)
    plain = models.from_pretrained(path, rope_scaling=None)
    assert np.abs(np.asarray(model(jnp.asarray(IDS)).logits) - np.asarray(plain(jnp.asarray(IDS)).logits)).max() > 1e-3
    _, path = checkpoints["mistral-window"]
    model = models.from_pretrained(path)
    full = models.from_pretrained(path, sliding_window=None)
    a, b = (np.asarray(m(jnp.asarray(IDS)).logits) for m in (model, full))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)  # within the window: the same
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-llama3", "qwen2"])
def test_save_round_trip_is_readable_by_transformers(checkpoints, name, tmp_path):
    hf, path = checkpoints[name]
    model = models.from_pretrained(path)
    models.save_hf_checkpoint(model, tmp_path)
    again = type(hf).from_pretrained(str(tmp_path)).eval()
    np.testing.assert_array_equal(_torch_logits(again, IDS), _torch_logits(hf, IDS))
    reloaded = models.from_pretrained(tmp_path)
    for k, v in models.named_params(model).items():
        np.testing.assert_array_equal(np.asarray(models.named_params(reloaded)[k].get_value()), np.asarray(v.get_value()))


def test_sharded_checkpoint_and_base_model(checkpoints, tmp_path):
    hf, _ = checkpoints["llama-gqa-llama3"]
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = models.from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS)).logits), _torch_logits(hf, IDS), atol=1e-4)
    base = models.from_pretrained(tmp_path, head="base")
    assert isinstance(base, models.DecoderModel) and base(jnp.asarray(IDS)).logits is None
    with pytest.raises(ValueError, match="causal_lm"):
        models.from_pretrained(tmp_path, head="mlm")


def test_unsupported_configs_name_what_is_supported(checkpoints, tmp_path):
    _, path = checkpoints["llama-gqa-llama3"]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    bad = dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        models.DecoderConfig.from_dict(bad)
    with pytest.raises(ValueError, match="model_type='falcon'.*supported model types.*gpt2.*llama"):
        models.DecoderConfig.from_dict(dict(cfg, model_type="falcon"))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        models.DecoderConfig(**SMALL, num_key_value_heads=3)


def test_family_description_of_decoders():
    llama = models.DecoderForCausalLM(models.DecoderConfig(**SMALL, num_key_value_heads=2), rngs=nnx.Rngs(0))
    gpt2 = models.DecoderForCausalLM(models.DecoderConfig(
        **SMALL, model_type="gpt2", norm_type="layernorm", position_type="learned", gated_ffn=False,
        hidden_act="gelu_new", qkv_bias=True, o_bias=True, ffn_bias=True, tie_word_embeddings=True),
        rngs=nnx.Rngs(0))
    assert [s.role for s in F.sites(llama) if s.layer == 0] == ["q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out"]
    assert [s.role for s in F.sites(gpt2) if s.layer == 0] == ["q", "k", "v", "o", "ffn_in", "ffn_out"]
    assert F.head_layout(llama, 1) == F.HeadLayout(4, 2, 8)
    assert F.head_paths(llama) == ("llama.final_norm", "lm_head") and F.head_paths(gpt2) == ("gpt2.final_norm",)
    # embed + run_layers in two pieces + head == the forward pass; captures feed the sites
    ids = jnp.asarray(IDS)
    for model in (llama, gpt2):
        h = F.embed(model, {"input_ids": ids})
        h, _ = F.run_layers(model, h, start=0, stop=1)
        h, inter = F.run_layers(model, h, start=1, stop=2, capture=("attn_input", "ffn_input", "ffn_intermediate"))
        np.testing.assert_allclose(np.asarray(F.head(model, h)), np.asarray(model(ids).logits), atol=1e-5)
        q = F.get_module(model, F.site_path(model, 1, "q"))
        assert inter[F.site_input(model, "q")][0].shape == (2, 12, 32)
        assert inter[F.site_input(model, "ffn_out")][0].shape[-1] == 48 and q.kernel.shape == (32, 32)


def test_resized_gqa_equals_masked_model():
    """Removing a whole key/value group (and FFN neurons) == zeroing what they contribute."""
    model = models.DecoderForCausalLM(models.DecoderConfig(**SMALL, num_key_value_heads=2), rngs=nnx.Rngs(1))
    d = model.config.attention_head_dim
    params = {k: np.asarray(v.get_value()).copy() for k, v in models.named_params(model).items()}
    masked = {**params}
    o = F.site_path(model, 0, "o") + ".kernel"
    masked[o] = params[o].copy()
    masked[o][0:2 * d] = 0.0  # query heads 0, 1 = KV group 0 of layer 0
    out = F.site_path(model, 1, "ffn_out") + ".kernel"
    masked[out] = params[out].copy()
    masked[out][[3, 7]] = 0.0
    for k, v in models.named_params(model).items():
        v.set_value(jnp.asarray(masked[k]))
    small = F.resized(model, heads=[[2, 3], [0, 1, 2, 3]],
                      neurons=[list(range(48)), [i for i in range(48) if i not in (3, 7)]])
    assert small.config.layer_num_key_value_heads == (1, 2)
    assert F.head_layout(small, 0) == F.HeadLayout(2, 1, 8)
    np.testing.assert_allclose(np.asarray(small(jnp.asarray(IDS)).logits), np.asarray(model(jnp.asarray(IDS)).logits),
                               atol=1e-5)
    with pytest.raises(ValueError, match="whole groups"):
        F.resized(model, heads=[[1, 2], [0, 1, 2, 3]])


def test_perplexity_is_exp_of_the_transformers_loss_on_the_same_blocks(checkpoints):
    from efficient_nlp import data

    hf, path = checkpoints["llama-gqa-llama3"]
    model = models.from_pretrained(path)
    blocks = np.random.default_rng(3).integers(0, V, (5, 16))
    ours = data.lm.blocks_perplexity(lambda ids: model(jnp.asarray(ids)).logits, blocks, batch_size=2)
    with torch.no_grad():
        losses = [float(hf(torch.tensor(b[None]), labels=torch.tensor(b[None])).loss) for b in blocks]
    assert ours["tokens"] == 5 * 15
    np.testing.assert_allclose(ours["perplexity"], np.exp(np.mean(losses)), rtol=1e-4)


def test_decoder_flops_count_gqa_the_gated_ffn_and_the_lm_head():
    from efficient_nlp.models.flops import forward_flops

    cfg = models.DecoderConfig(**SMALL, num_key_value_heads=2)
    t, h, d, i = 10, 32, 8, 48
    layer = 2 * t * h * d * (2 * 4 + 2 * 2) + 2 * 2 * t * t * d * 4 + 3 * 2 * t * h * i
    assert forward_flops(cfg, t) == 2 * layer
    assert forward_flops(cfg, t, classifier=True) == 2 * layer + 2 * t * h * V


def test_longer_input_than_the_learned_positions_is_refused():
    gpt2 = models.DecoderForCausalLM(models.DecoderConfig(
        **{**SMALL, "max_position_embeddings": 8}, model_type="gpt2", norm_type="layernorm",
        position_type="learned", gated_ffn=False, hidden_act="gelu_new"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the 8 learned positions"):
        gpt2(jnp.zeros((1, 9), jnp.int32))
