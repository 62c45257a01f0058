"""The Llama family (Llama 2/3, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU FFN,
grouped-query attention, no biases (Qwen2: biases on q / k / v; Llama's ``attention_bias`` /
``mlp_bias`` when set), tied or untied LM head.

==============================================  ==========================================
HF (without the ``model.`` prefix)              ours
==============================================  ==========================================
embed_tokens.weight                             llama.embeddings.word_embeddings.embedding
layers.i.input_layernorm.weight                 llama.layers.i.attention.norm.scale
layers.i.self_attn.{q,k,v,o}_proj.*             llama.layers.i.attention.{query,key,value,output}.*
layers.i.post_attention_layernorm.weight        llama.layers.i.ffn.norm.scale
layers.i.mlp.{gate,up,down}_proj.*              llama.layers.i.ffn.{gate,intermediate,output}.*
norm.weight                                     llama.final_norm.scale
lm_head.weight (untied only)                    lm_head.kernel
==============================================  ==========================================

Rotary settings are read from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` /
``rope_scaling`` (older files); scaling types ``default``, ``linear`` and ``llama3``.
"""
from __future__ import annotations

from efficient_nlp.models.decoder_config import ROPE_SCALING_TYPES, per_layer_hf
from efficient_nlp.models.families.decoders import decoder_family, decoder_layers
from efficient_nlp.models.family import FamilyError, register

_MEMBERS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _linear(m: dict, hf: str, ours: str, bias: bool) -> None:
    m[hf + ".weight"] = (ours + ".kernel", True)
    if bias:
        m[hf + ".bias"] = (ours + ".bias", False)


def _hf_map(model) -> dict:
    c = model.config
    m: dict = {"embed_tokens.weight": ("llama.embeddings.word_embeddings.embedding", False)}
    for i in range(decoder_layers(model)):
        hf, ours = f"layers.{i}", f"llama.layers.{i}"
        m[f"{hf}.input_layernorm.weight"] = (f"{ours}.attention.norm.scale", False)
        for theirs, mine in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            _linear(m, f"{hf}.self_attn.{theirs}", f"{ours}.attention.{mine}", c.qkv_bias)
        _linear(m, f"{hf}.self_attn.o_proj", f"{ours}.attention.output", c.o_bias)
        m[f"{hf}.post_attention_layernorm.weight"] = (f"{ours}.ffn.norm.scale", False)
        for theirs, mine in (("gate_proj", "gate"), ("up_proj", "intermediate"), ("down_proj", "output")):
            _linear(m, f"{hf}.mlp.{theirs}", f"{ours}.ffn.{mine}", c.ffn_bias)
    m["norm.weight"] = ("llama.final_norm.scale", False)
    if getattr(model, "lm_head", None) is not None:
        m["lm_head.weight"] = ("lm_head.kernel", True)
    return m


def _rope(d: dict) -> tuple[float, dict | None]:
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise FamilyError(f"config.json has rope scaling type {kind!r}, which is not supported; supported: "
                          f"{', '.join(ROPE_SCALING_TYPES)}")
    if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FamilyError(f"config.json has partial_rotary_factor={d['partial_rotary_factor']}; only 1.0 is supported")
    if kind == "default":
        return theta, None
    params.pop("type", None)
    params["rope_type"] = kind
    return theta, params


def _from_hf(d: dict) -> dict:
    member = d.get("model_type", "llama")
    theta, scaling = _rope(d)
    out = dict(d)
    out.update(model_type="llama", norm_type="rmsnorm", position_type="rotary", gated_ffn=True,
               norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
               attention_probs_dropout_prob=d.get("attention_dropout", 0.0),
               tie_word_embeddings=d.get("tie_word_embeddings", False), hidden_act=d.get("hidden_act", "silu"))
    if member == "qwen2":
        out.update(qkv_bias=True, o_bias=False, ffn_bias=False,
                   sliding_window=d.get("sliding_window") if d.get("use_sliding_window") else None)
    elif member == "mistral":
        out.update(qkv_bias=False, o_bias=False, ffn_bias=False)
    else:
        bias = bool(d.get("attention_bias", False))
        out.update(qkv_bias=bias, o_bias=bias, ffn_bias=bool(d.get("mlp_bias", False)), sliding_window=None)
    return out


def _to_hf(config, architecture: str) -> dict:
    member = config.hf_model_type or "llama"
    biases = (config.qkv_bias, config.o_bias, config.ffn_bias)
    need = {"qwen2": (True, False, False), "mistral": (False, False, False)}.get(member)
    if (need is not None and biases != need) or (need is None and config.qkv_bias != config.o_bias):
        raise FamilyError(f"a {member} checkpoint cannot hold biases q/k/v={config.qkv_bias}, o={config.o_bias}, "
                          f"ffn={config.ffn_bias}")
    rope = {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling_dict}
    d = {"architectures": [architecture.replace("Llama", _MEMBERS.get(member, "Llama"))], "model_type": member,
         "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
         "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
         "num_key_value_heads": config.num_kv_heads, "head_dim": config.attention_head_dim,
         "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
         "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
         "rope_theta": config.rope_theta, "rope_parameters": rope,
         "rope_scaling": config.rope_scaling_dict or None,
         "attention_dropout": config.attention_probs_dropout_prob, "tie_word_embeddings": config.tie_word_embeddings,
         "initializer_range": config.initializer_range, "bos_token_id": config.bos_token_id,
         "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
         "pad_token_id": config.pad_token_id}
    if member == "llama":
        d.update(attention_bias=config.qkv_bias, mlp_bias=config.ffn_bias)
    if member == "mistral":
        d["sliding_window"] = config.sliding_window
    if member == "qwen2":
        d.update(use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window)
    d.update(per_layer_hf(config))
    return d


FAMILY = register(decoder_family(
    "llama", tuple(_MEMBERS), gated=True,
    config_from_hf=_from_hf, config_to_hf=_to_hf, hf_map=_hf_map, hf_prefix="model.",
    hf_head_groups={"lm_head.": "LM head"},
    hf_ignored=r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq|lm_head\.weight",
    architectures={"DecoderModel": "LlamaModel", "DecoderForCausalLM": "LlamaForCausalLM"}))
