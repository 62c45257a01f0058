"""DistilBERT: no token types, no pooler; its post-LayerNorm layers are BERT's
under other names (``q_lin / k_lin / v_lin / out_lin``, ``sa_layer_norm``, ``ffn.lin1 / lin2``,
``output_layer_norm``); the classification head is ``pre_classifier`` + ReLU + ``classifier``
on the first token; the LM head is ``vocab_transform`` + activation + ``vocab_layer_norm`` +
``vocab_projector`` tied to the word embedding.  Its config says ``dim``, ``n_layers``,
``n_heads``, ``hidden_dim``, ``activation``, ``dropout``, ``attention_dropout``,
``seq_classif_dropout``; every LayerNorm has eps 1e-12.  (With ``sinusoidal_pos_embds`` the
position table is stored in the checkpoint all the same, so it loads as a learned table.)
"""
from __future__ import annotations

from efficient_nlp.models.config import label_maps
from efficient_nlp.models.families.bert import encoder_family, heads, linear, norm
from efficient_nlp.models.family import register

_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
          "attention_dropout": "attention_probs_dropout_prob", "seq_classif_dropout": "classifier_dropout"}


def _hf_map(model) -> dict:
    m: dict = {}
    for name in ("word_embeddings", "position_embeddings"):
        m[f"embeddings.{name}.weight"] = (f"distilbert.embeddings.{name}.embedding", False)
    norm(m, "embeddings.LayerNorm", "distilbert.embeddings.layer_norm")
    for i in range(len(model.distilbert.encoder.layers)):
        hf, ours = f"transformer.layer.{i}", f"distilbert.encoder.layers.{i}"
        for theirs, mine in (("q_lin", "query"), ("k_lin", "key"), ("v_lin", "value"), ("out_lin", "output")):
            linear(m, f"{hf}.attention.{theirs}", f"{ours}.attention.{mine}")
        norm(m, f"{hf}.sa_layer_norm", f"{ours}.attention.layer_norm")
        linear(m, f"{hf}.ffn.lin1", f"{ours}.ffn.intermediate")
        linear(m, f"{hf}.ffn.lin2", f"{ours}.ffn.output")
        norm(m, f"{hf}.output_layer_norm", f"{ours}.ffn.layer_norm")
    heads(m, model, pre_classifier="pre_classifier", classifier="classifier",
          lm=("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"))
    return m


def _from_hf(d: dict) -> dict:
    out = {_NAMES.get(k, k): v for k, v in d.items()}
    out.update(model_type="distilbert", type_vocab_size=0, layer_norm_eps=1e-12)
    return out


def _to_hf(config, architecture: str) -> dict:
    ours = {v: k for k, v in _NAMES.items()}
    d = {"architectures": [architecture], "model_type": "distilbert", "sinusoidal_pos_embds": False,
         "tie_word_embeddings": True, "qa_dropout": 0.1}
    for k, v in config.to_dict().items():
        if k in ("type_vocab_size", "layer_norm_eps", "model_type", "embedding_size", "num_labels",
                 "hf_model_type"):
            continue
        if k == "head_dim":
            if v is not None and (config.hidden_size % config.num_attention_heads
                                  or v != config.hidden_size // config.num_attention_heads):
                d["head_dim"] = v
            continue
        if k in ("layer_num_attention_heads", "layer_intermediate_sizes"):
            if v is not None:
                d[k] = list(v)
                d["head_dim"] = config.attention_head_dim
            continue
        d[ours.get(k, k)] = v
    if d.get("seq_classif_dropout") is None:  # ours falls back to the hidden dropout; HF needs a value
        d["seq_classif_dropout"] = config.hidden_dropout_prob
    d.update(label_maps(config.num_labels))
    return d


FAMILY = register(encoder_family(
    "distilbert", ("distilbert",),
    head_modules=("pre_classifier", "classifier", "lm_head"),
    config_from_hf=_from_hf, config_to_hf=_to_hf, hf_map=_hf_map,
    hf_head_groups={"pre_classifier.": "classifier", "classifier.": "classifier", "vocab_transform.": "masked-LM head",
                    "vocab_layer_norm.": "masked-LM head", "vocab_projector.": "masked-LM head"},
    hf_ignored=r"embeddings\.position_ids|vocab_projector\.weight",
    architectures={"BertModel": "DistilBertModel",
                   "BertForSequenceClassification": "DistilBertForSequenceClassification",
                   "BertForMaskedLM": "DistilBertForMaskedLM"}))
