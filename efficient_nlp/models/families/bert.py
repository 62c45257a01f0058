"""BERT: the reference layout of the encoder families.

HF tensor names (without the ``bert.`` prefix of task checkpoints) -> our parameter paths:

=====================================================  =============================================
embeddings.{word,position,token_type}_embeddings.weight  bert.embeddings.<same>.embedding
embeddings.LayerNorm.{weight,bias} (or gamma/beta)     bert.embeddings.layer_norm.{scale,bias}
encoder.layer.i.attention.self.{query,key,value}.*     bert.encoder.layers.i.attention.{query,key,value}.*
encoder.layer.i.attention.output.dense.*               bert.encoder.layers.i.attention.output.*
encoder.layer.i.attention.output.LayerNorm.*           bert.encoder.layers.i.attention.layer_norm.*
encoder.layer.i.intermediate.dense.*                   bert.encoder.layers.i.ffn.intermediate.*
encoder.layer.i.output.dense.*                         bert.encoder.layers.i.ffn.output.*
encoder.layer.i.output.LayerNorm.*                     bert.encoder.layers.i.ffn.layer_norm.*
pooler.dense.*                                         bert.pooler.dense.*
classifier.{weight,bias}                               classifier.{kernel,bias}
cls.predictions.transform.dense.*                      lm_head.dense.*
cls.predictions.transform.LayerNorm.*                  lm_head.layer_norm.*
cls.predictions.bias (or .decoder.bias)                lm_head.bias
=====================================================  =============================================
"""
from __future__ import annotations

from efficient_nlp.models.config import bert_hf_dict
from efficient_nlp.models.family import Family, register

#: The layer layout shared by every BERT-layout encoder family (our module names).
ENCODER_LAYER_SITES = {"q": "attention.query", "k": "attention.key", "v": "attention.value",
                       "o": "attention.output", "ffn_in": "ffn.intermediate", "ffn_out": "ffn.output"}
#: The capture (`efficient_nlp.models.CAPTURE_NAMES`) whose per-layer entry feeds each site.
ENCODER_SITE_INPUTS = {"q": "hidden_states", "k": "hidden_states", "v": "hidden_states", "o": "context",
                       "ffn_in": "mha_out", "ffn_out": "ffn_intermediate"}


def linear(m: dict, hf: str, ours: str) -> None:
    """Map a torch Linear (weight [out, in], transposed) and its bias."""
    m[hf + ".weight"] = (ours + ".kernel", True)
    m[hf + ".bias"] = (ours + ".bias", False)


def norm(m: dict, hf: str, ours: str) -> None:
    m[hf + ".weight"] = (ours + ".scale", False)
    m[hf + ".bias"] = (ours + ".bias", False)


def heads(m: dict, model, *, classifier: str, pre_classifier: str | None = None, lm=None) -> None:
    """Map the heads ``model`` has: ``classifier`` (and ``pre_classifier``) are HF names of those
    Linears; ``lm`` the HF names ``(dense, LayerNorm, bias)`` of the masked-LM head."""
    if getattr(model, "classifier", None) is not None:
        if pre_classifier is not None:
            linear(m, pre_classifier, "pre_classifier")
        linear(m, classifier, "classifier")
    if getattr(model, "lm_head", None) is not None:
        dense, layer_norm, bias = lm
        linear(m, dense, "lm_head.dense")
        norm(m, layer_norm, "lm_head.layer_norm")
        m[bias] = ("lm_head.bias", False)


def bert_layers(m: dict, model, backbone: str) -> None:
    """BERT's per-layer names (``encoder.layer.i...``), shared with RoBERTa and ELECTRA."""
    for i in range(len(getattr(model, backbone).encoder.layers)):
        hf, ours = f"encoder.layer.{i}", f"{backbone}.encoder.layers.{i}"
        for proj in ("query", "key", "value"):
            linear(m, f"{hf}.attention.self.{proj}", f"{ours}.attention.{proj}")
        linear(m, f"{hf}.attention.output.dense", f"{ours}.attention.output")
        norm(m, f"{hf}.attention.output.LayerNorm", f"{ours}.attention.layer_norm")
        linear(m, f"{hf}.intermediate.dense", f"{ours}.ffn.intermediate")
        linear(m, f"{hf}.output.dense", f"{ours}.ffn.output")
        norm(m, f"{hf}.output.LayerNorm", f"{ours}.ffn.layer_norm")


def bert_embeddings(m: dict, model, backbone: str) -> None:
    emb = getattr(model, backbone).embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if getattr(emb, name) is not None:
            m[f"embeddings.{name}.weight"] = (f"{backbone}.embeddings.{name}.embedding", False)
    norm(m, "embeddings.LayerNorm", f"{backbone}.embeddings.layer_norm")


def _hf_map(model) -> dict:
    m: dict = {}
    bert_embeddings(m, model, "bert")
    bert_layers(m, model, "bert")
    if model.bert.pooler is not None:
        linear(m, "pooler.dense", "bert.pooler.dense")
    heads(m, model, classifier="classifier", lm=("cls.predictions.transform.dense",
                                                 "cls.predictions.transform.LayerNorm", "cls.predictions.bias"))
    return m


def _from_hf(d: dict) -> dict:
    return {**d, "model_type": "bert"}


def encoder_family(name: str, model_types, **kw) -> Family:
    """A `Family` with the BERT-layout layer stack (shared by the encoder families)."""
    return Family(
        name=name, model_types=tuple(model_types), layers="{backbone}.encoder.layers",
        layer_sites=ENCODER_LAYER_SITES, site_inputs=ENCODER_SITE_INPUTS, attention="attention",
        unsigned_input_roles=("ffn_out",), embeddings="{backbone}.embeddings",
        word_embedding="{backbone}.embeddings.word_embeddings", hf_prefix=name + ".", **kw)


FAMILY = register(encoder_family(
    "bert", ("bert",),
    head_modules=("{backbone}.pooler", "pre_classifier", "classifier", "lm_head"),
    config_from_hf=_from_hf, config_to_hf=bert_hf_dict, hf_map=_hf_map,
    hf_head_groups={"pooler.": "pooler", "classifier.": "classifier", "cls.predictions.": "masked-LM head"},
    hf_ignored=(r"embeddings\.position_ids|embeddings\.token_type_ids|cls\.seq_relationship\..*"
                r"|cls\.predictions\.decoder\.weight|cls\.predictions\.decoder\.bias"),
    architectures={"BertModel": "BertModel", "BertForSequenceClassification": "BertForSequenceClassification",
                   "BertForMaskedLM": "BertForMaskedLM"}))
