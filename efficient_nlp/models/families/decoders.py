"""What the decoder families share: the layer layout of `efficient_nlp.models.decoder` and the
`Family` constructor for it (used by ``gpt2.py`` and ``llama.py``)."""
from __future__ import annotations

from efficient_nlp.models.family import Family

#: Matmul sites of a decoder layer (our module names); ``ffn_gate`` only in gated FFNs.
DECODER_LAYER_SITES = {"q": "attention.query", "k": "attention.key", "v": "attention.value",
                       "o": "attention.output", "ffn_in": "ffn.intermediate", "ffn_gate": "ffn.gate",
                       "ffn_out": "ffn.output"}
#: Pre-norm layers: q/k/v read the normalised residual stream, ffn_in / ffn_gate the second one.
DECODER_SITE_INPUTS = {"q": "attn_input", "k": "attn_input", "v": "attn_input", "o": "context",
                       "ffn_in": "ffn_input", "ffn_gate": "ffn_input", "ffn_out": "ffn_intermediate"}


def decoder_family(name: str, model_types, *, gated: bool, unsigned_input_roles=(), **kw) -> Family:
    """A `Family` with the decoder layer stack under ``{backbone}.layers``."""
    sites = {r: p for r, p in DECODER_LAYER_SITES.items() if gated or r != "ffn_gate"}
    return Family(
        name=name, model_types=tuple(model_types), layers="{backbone}.layers", layer_sites=sites,
        site_inputs={r: DECODER_SITE_INPUTS[r] for r in sites}, attention="attention",
        unsigned_input_roles=tuple(unsigned_input_roles), embeddings="{backbone}.embeddings",
        word_embedding="{backbone}.embeddings.word_embeddings", head_modules=("{backbone}.final_norm", "lm_head"),
        kind="decoder", site_norms={r: ("ffn.norm" if r.startswith("ffn") else "attention.norm")
                                    for r in sites if r in ("q", "k", "v", "ffn_in", "ffn_gate")}, **kw)


def decoder_layers(model) -> int:
    return len(model.backbone.layers)
