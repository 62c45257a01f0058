"""Save and reload a factorised model (docs/lowrank.md).

    lowrank.save(model, "out/")        # model.safetensors, config.json, lowrank.json
    model = lowrank.load("out/")       # the same model, the same logits

``model.safetensors`` holds every parameter under its own dotted path
(``bert.encoder.layers.0.attention.query.down.kernel``): a factorised model has no HF layout.
``config.json`` is the dense model's HF config (as `efficient_nlp.models.save_hf_checkpoint`
writes it) and ``lowrank.json`` the factorisation: ``{"ranks": {site path: rank},
"embedding_dim": r or null, "model_class": ..., "add_pooling_layer": ...}``.  `load` builds the
dense model from the config, gives it the saved structure (`restructure`) and loads the
parameters into it.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models
from efficient_nlp.lowrank.modules import FactorizedEmbed, LowRankLinear
from efficient_nlp.models import family as F
from efficient_nlp.models.hf_checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_safetensors

LAYOUT_NAME = "lowrank.json"
_MAX_LISTED = 12


def layout(model) -> dict:
    """``{"ranks": {path: rank}, "embedding_dim": r or None}``: where ``model`` holds a
    `LowRankLinear` (and its rank) and the width of a factorised word embedding."""
    ranks = {".".join(map(str, path)): mod.rank for path, mod in nnx.iter_modules(model)
             if isinstance(mod, LowRankLinear)}
    emb = F.get_module(model, F.word_embedding_path(model))
    return {"ranks": ranks, "embedding_dim": emb.dim if isinstance(emb, FactorizedEmbed) else None}


def restructure(model, layout: dict, *, seed: int = 0):
    """Replace, in place, the Linears at ``layout["ranks"]``'s paths by freshly initialised
    `LowRankLinear` of those ranks and the word embedding by a `FactorizedEmbed` of width
    ``layout["embedding_dim"]`` (if not None); returns ``model``.  The structure `load` fills."""
    rngs = nnx.Rngs(seed)
    for path, rank in layout["ranks"].items():
        try:
            linear = F.get_module(model, path)
        except (AttributeError, IndexError):
            raise ValueError(f"lowrank.json names {path}, which the model built from config.json does not have: "
                             "the two files are from different models; save the model again with "
                             "efficient_nlp.lowrank.save") from None
        if not isinstance(linear, nnx.Linear):
            raise ValueError(f"lowrank layout names {path}, which is a {type(linear).__name__}, not an nnx.Linear")
        F.set_module(model, path, LowRankLinear.like(linear, int(rank), rngs=rngs))
    dim = layout.get("embedding_dim")
    if dim is not None:
        path = F.word_embedding_path(model)
        emb = F.get_module(model, path)
        F.set_module(model, path, FactorizedEmbed(emb.num_embeddings, emb.features, int(dim), dtype=emb.dtype,
                                                  param_dtype=emb.embedding.get_value().dtype, rngs=rngs))
    return model


def _build(cls, config, add_pooling_layer: bool, lay: dict, seed: int = 0):
    kwargs = {"add_pooling_layer": add_pooling_layer} if cls is models.BertModel else {}
    return restructure(cls(config, rngs=nnx.Rngs(seed), **kwargs), lay, seed=seed)


def _structure(model) -> dict[str, Any]:
    """Every parameter's shape and every submodule's class, by path."""
    out: dict[str, Any] = {k: tuple(v.get_value().shape) for k, v in models.named_params(model).items()}
    out.update({".".join(map(str, p)) + " (module)": type(m).__name__ for p, m in nnx.iter_modules(model)})
    return out


def save(model, out_dir: str | os.PathLike) -> str:
    """Write ``model.safetensors`` (our parameter names), ``config.json`` and ``lowrank.json``
    (module docstring) to ``out_dir``; returns it.  ValueError for a model that is not
    factorised (use `efficient_nlp.models.save_hf_checkpoint`) or holds more than the dense
    model of its config plus the factorisation (e.g. quantizers: save before quantizing)."""
    from safetensors.numpy import save_file

    fam = F.family_of(model)
    kind = type(model).__name__
    if kind not in fam.architectures:
        raise TypeError(f"save writes the models of efficient_nlp.models ({sorted(fam.architectures)}), got {kind}")
    wrapped = [".".join(map(str, path)) for path, m in nnx.iter_modules(model) if hasattr(m, "base")]
    if wrapped:
        raise ValueError(f"{wrapped[0]} wraps its Linear (LoRA or an adapter); save the factorised model before "
                         "adding them and the adapter with efficient_nlp.peft.save_adapter, or merge LoRA first "
                         "(efficient_nlp.peft.merge)")
    lay = layout(model)
    if not lay["ranks"] and lay["embedding_dim"] is None:
        raise ValueError("the model is not factorised (no LowRankLinear, no FactorizedEmbed); save it with "
                         "models.save_hf_checkpoint")
    pooler = kind != "BertModel" or model.backbone.pooler is not None
    want = _structure(nnx.eval_shape(lambda: _build(type(model), model.config, pooler, lay)))
    have = _structure(model)
    if want != have:
        bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError("the model holds other parameters or modules than its config's dense model with its "
                         "factorisation, so config.json + lowrank.json would not rebuild it (quantize or wrap after "
                         "loading, and set model.config to match a resized model):\n  "
                         + "\n  ".join(f"{k}: expected {want.get(k)}, model has {have.get(k)}"
                                       for k in bad[:_MAX_LISTED]))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.ascontiguousarray(np.asarray(jax.device_get(v.get_value())))
               for k, v in models.named_params(model).items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "efficient_nlp.lowrank"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(fam.architectures[kind]), f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, LAYOUT_NAME), "w", encoding="utf-8") as f:
        json.dump({**lay, "model_class": kind, "add_pooling_layer": pooler}, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def load(out_dir: str | os.PathLike, num_labels: int | None = None, *, seed: int = 0):
    """The factorised model written by `save`.  ``num_labels``: build an encoder's sequence
    classifier with that many outputs instead of the saved class; head parameters the
    directory lacks are then freshly initialised (seed ``seed``).

    Raises FileNotFoundError for a directory without ``lowrank.json`` (not a factorised model:
    use `efficient_nlp.models.from_pretrained`), `efficient_nlp.models.CheckpointMismatchError`
    when the parameters do not fit the rebuilt structure."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"directory {out_dir!r} does not exist")
    lay_file = os.path.join(out_dir, LAYOUT_NAME)
    if not os.path.isfile(lay_file):
        raise FileNotFoundError(f"{out_dir} has no {LAYOUT_NAME}: it is not a factorised model; load it with "
                                "models.from_pretrained")
    with open(lay_file, encoding="utf-8") as f:
        lay = json.load(f)
    overrides = {} if num_labels is None else {"num_labels": num_labels}
    config = models.config_from_pretrained(out_dir, **overrides)
    cls = getattr(models, lay["model_class"])
    if num_labels is not None:
        if isinstance(config, models.DecoderConfig):
            raise ValueError(f"{out_dir} holds a decoder, which has no classification head; drop num_labels")
        cls = models.BertForSequenceClassification
    model = _build(cls, config, lay.get("add_pooling_layer", True), lay, seed)
    tensors = read_safetensors(out_dir)
    params = models.named_params(model)
    fresh = tuple(p + "." for p in F.head_paths(model)) if num_labels is not None else ()
    missing = sorted(k for k in params if k not in tensors and not k.startswith(fresh))
    unexpected = sorted(k for k in tensors if k not in params)
    misshaped = sorted(k for k in tensors
                       if k in params and tuple(tensors[k].shape) != tuple(params[k].get_value().shape))
    if missing or unexpected or misshaped:
        lines = [f"{out_dir} does not fit the {cls.__name__} that its config.json and {LAYOUT_NAME} describe:"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:_MAX_LISTED])
                             + (" ..." if len(names) > _MAX_LISTED else ""))
        raise models.CheckpointMismatchError("\n".join(lines))
    for name, var in params.items():
        if name in tensors:
            var.set_value(jnp.asarray(tensors[name], dtype=var.get_value().dtype))
    return model


__all__ = ["LAYOUT_NAME", "layout", "load", "restructure", "save"]
