"""GPT-2: pre-LayerNorm decoder with learned positions, ``gelu_new``, biases everywhere and
the LM head tied to the token embedding.

HF stores Conv1D weights as [in, out] (already our kernel layout, no transpose) and fuses the
query, key and value projections into one ``c_attn`` ([hidden, 3 * width], q | k | v):

==========================================  ==========================================
HF (without the ``transformer.`` prefix)    ours
==========================================  ==========================================
wte.weight / wpe.weight                     gpt2.embeddings.{word,position}_embeddings.embedding
h.i.ln_1.{weight,bias}                      gpt2.layers.i.attention.norm.{scale,bias}
h.i.attn.c_attn.{weight,bias}               gpt2.layers.i.attention.{query|key|value}.{kernel,bias}
h.i.attn.c_proj.*                           gpt2.layers.i.attention.output.*
h.i.ln_2.*                                  gpt2.layers.i.ffn.norm.*
h.i.mlp.c_fc.* / h.i.mlp.c_proj.*           gpt2.layers.i.ffn.intermediate.* / ffn.output.*
ln_f.*                                      gpt2.final_norm.*
==========================================  ==========================================
"""
from __future__ import annotations

from efficient_nlp.models.decoder_config import per_layer_hf
from efficient_nlp.models.families.bert import norm
from efficient_nlp.models.families.decoders import decoder_family, decoder_layers
from efficient_nlp.models.family import FamilyError, register

_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
          "n_inner": "intermediate_size", "activation_function": "hidden_act", "n_positions": "max_position_embeddings",
          "layer_norm_epsilon": "norm_eps", "resid_pdrop": "hidden_dropout_prob",
          "attn_pdrop": "attention_probs_dropout_prob", "embd_pdrop": "embedding_dropout_prob"}


def _conv(m: dict, hf: str, ours) -> None:
    """A Conv1D (weight [in, out], no transpose); ``ours`` may be a tuple (fused outputs)."""
    m[hf + ".weight"] = (tuple(o + ".kernel" for o in ours) if isinstance(ours, tuple) else ours + ".kernel", False)
    m[hf + ".bias"] = (tuple(o + ".bias" for o in ours) if isinstance(ours, tuple) else ours + ".bias", False)


def _hf_map(model) -> dict:
    m: dict = {"wte.weight": ("gpt2.embeddings.word_embeddings.embedding", False),
               "wpe.weight": ("gpt2.embeddings.position_embeddings.embedding", False)}
    for i in range(decoder_layers(model)):
        hf, ours = f"h.{i}", f"gpt2.layers.{i}"
        norm(m, f"{hf}.ln_1", f"{ours}.attention.norm")
        _conv(m, f"{hf}.attn.c_attn", tuple(f"{ours}.attention.{p}" for p in ("query", "key", "value")))
        _conv(m, f"{hf}.attn.c_proj", f"{ours}.attention.output")
        norm(m, f"{hf}.ln_2", f"{ours}.ffn.norm")
        _conv(m, f"{hf}.mlp.c_fc", f"{ours}.ffn.intermediate")
        _conv(m, f"{hf}.mlp.c_proj", f"{ours}.ffn.output")
    norm(m, "ln_f", "gpt2.final_norm")
    if getattr(model, "lm_head", None) is not None:
        m["lm_head.weight"] = ("lm_head.kernel", True)
    return m


def _from_hf(d: dict) -> dict:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if d.get(key, ok) != ok:
            raise FamilyError(f"config.json has {key}={d[key]!r}; the GPT-2 family supports only {key}={ok}")
    out = {_NAMES.get(k, k): v for k, v in d.items()}
    if out.get("intermediate_size") is None:
        out["intermediate_size"] = 4 * out["hidden_size"]
    out.update(model_type="gpt2", norm_type="layernorm", position_type="learned", gated_ffn=False,
               qkv_bias=True, o_bias=True, ffn_bias=True, tie_word_embeddings=d.get("tie_word_embeddings", True))
    out.setdefault("hidden_act", "gelu_new")
    out.setdefault("norm_eps", 1e-5)
    return out


def _to_hf(config, architecture: str) -> dict:
    ours = {v: k for k, v in _NAMES.items()}
    d = {"architectures": [architecture], "model_type": "gpt2", "vocab_size": config.vocab_size,
         "tie_word_embeddings": config.tie_word_embeddings,
         "scale_attn_weights": True, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
         "pad_token_id": config.pad_token_id, "initializer_range": config.initializer_range}
    for k in _NAMES.values():
        d[ours[k]] = getattr(config, k)
    if config.num_key_value_heads not in (None, config.num_attention_heads):
        raise FamilyError("GPT-2 has no grouped-query attention; num_key_value_heads must equal num_attention_heads")
    d.update(per_layer_hf(config))
    return d


FAMILY = register(decoder_family(
    "gpt2", ("gpt2",), gated=False, unsigned_input_roles=("ffn_out",),
    config_from_hf=_from_hf, config_to_hf=_to_hf, hf_map=_hf_map, hf_prefix="transformer.",
    hf_head_groups={"lm_head.": "LM head"},
    hf_ignored=r"h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight",
    architectures={"DecoderModel": "GPT2Model", "DecoderForCausalLM": "GPT2LMHeadModel"}))
