"""Adapter state, saving and loading: our own file and HF PEFT's directory.

* `adapter_state(model)`: the LoRA / adapter parameters with their settings as a plain dict
  ``{"format", "sites": {module path: {kind, settings, in_features, out_features, "tensors"}},
  "head": {param path: array}}`` (``head`` only when asked); `attach_adapter(base, state)` puts
  them on a model again and `unmerge(merged, state)` takes a merged LoRA back out.
* `save_adapter` / `load_adapter`: one ``.safetensors`` file holding only those tensors (named
  ``<module path>.<param>``), the settings as JSON in its header (key ``efficient_nlp.peft``).
* `save_peft_dir` / `load_peft_dir`: HF PEFT's LoRA directory, ``adapter_config.json`` (``r``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules`` ...) and ``adapter_model.safetensors``
  with ``base_model.model.<HF module>.lora_A.weight [r, d_in]`` and ``.lora_B.weight [d_out, r]``
  (torch layout) and the head as ``modules_to_save`` tensors, so that ``transformers`` + ``peft``
  load it onto the HF checkpoint of the base (`efficient_nlp.models.save_hf_checkpoint`).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models, train
from efficient_nlp.lowrank.modules import LowRankLinear
from efficient_nlp.models import family as F
from efficient_nlp.models.hf_checkpoint import hf_tensor_name
from efficient_nlp.peft.adapters import AdapterLinear
from efficient_nlp.peft.lora import (LoraLinear, PeftError, PeftParam, PeftWrapper, Trainable, features,
                                     linear_paths, low_rank_linear, wrappers)

FORMAT = "efficient_nlp.peft/1"
METADATA_KEY = "efficient_nlp.peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KINDS = {"lora": LoraLinear, "adapter": AdapterLinear}
_LISTED = 8


def adapter_state(model, *, head: bool = False) -> dict:
    """The LoRA / adapter parameters of ``model`` and their settings (module docstring); with
    ``head`` also the parameters of its head modules (a trained classifier)."""
    sites = {path: {**mod.settings(), "tensors": mod.tensors()} for path, mod in wrappers(model).items()}
    if not sites:
        raise PeftError(f"{type(model).__name__} holds no LoRA or adapter; add one with add_lora / add_adapters")
    state = {"format": FORMAT, "sites": sites}
    if head:
        heads = Trainable(tuple(F.head_paths(model)))
        state["head"] = {name: np.asarray(jax.device_get(var.get_value()))
                         for name, var in models.named_params(model).items()
                         if not isinstance(var, PeftParam) and heads(tuple(name.split(".")), var)}
    return state


def _check_format(adapter) -> None:
    if not isinstance(adapter, dict) or adapter.get("format") != FORMAT or not isinstance(adapter.get("sites"), dict):
        raise PeftError(f"not an adapter state (a dict with format {FORMAT!r} and 'sites', from adapter_state)")


def _module_at(model, path: str, linears):
    try:
        return F.get_module(model, path)
    except (AttributeError, IndexError, KeyError, ValueError):
        shown = ", ".join(list(linears)[:_LISTED]) + (" ..." if len(linears) > _LISTED else "")
        raise PeftError(f"the adapter targets {path}, which this model lacks; its Linear modules are: "
                        f"{shown}") from None


def _base_at(model, path: str, entry: dict, linears):
    """The Linear-like module at ``path``, checked against the adapter's base shape."""
    module = _module_at(model, path, linears)
    if isinstance(module, PeftWrapper):
        raise PeftError(f"{path} already holds a {module.kind}; attach an adapter to the base model")
    shape = features(module, path)
    want = (int(entry["in_features"]), int(entry["out_features"]))
    if shape != want:
        raise PeftError(f"{path}: the adapter was trained on a Linear of shape (d_in, d_out) = {want}, this model's "
                        f"is {shape}; load it into the model it was trained on")
    return module


def _attach(model, adapter: dict) -> None:
    """`attach_adapter` in place."""
    linears = linear_paths(model)
    for i, (path, entry) in enumerate(adapter["sites"].items()):
        cls = _KINDS.get(entry.get("kind"))
        if cls is None:
            raise PeftError(f"{path}: unknown adapter kind {entry.get('kind')!r}; known: {sorted(_KINDS)}")
        base = _base_at(model, path, entry, linears)
        settings = {k: v for k, v in entry.items() if k != "tensors"}
        F.set_module(model, path, cls.restore(base, settings, entry["tensors"], rngs=nnx.Rngs(i), site=path))
    params = models.named_params(model)
    for name, arr in adapter.get("head", {}).items():
        if name not in params:
            raise PeftError(f"the adapter holds the head parameter {name}, which this model lacks; its head "
                            f"modules are {F.head_paths(model)}")
        var = params[name]
        if np.shape(arr) != var.get_value().shape:
            raise PeftError(f"{name}: the adapter's head has shape {np.shape(arr)}, this model's "
                            f"{var.get_value().shape} (another number of labels?)")
        var.set_value(jnp.asarray(arr, var.get_value().dtype))


def attach_adapter(model, adapter: dict):
    """A copy of ``model`` with the LoRA / adapter modules of ``adapter`` (`adapter_state`) at
    their sites, holding its tensors (and its head, if saved).  The dropout streams start anew.

    Raises `PeftError` naming the site: a site the model lacks, a base of another shape, a site
    that already holds an adapter."""
    _check_format(adapter)
    out = train.copy_model(model)
    _attach(out, adapter)
    return out


def unmerge(model, adapter: dict):
    """The LoRA model again from a `efficient_nlp.peft.merge`-d one (``adapter =
    adapter_state(lora_model)``): at every LoRA site the kernel minus ``(alpha / r) A @ B`` (to
    float32 rounding of the original), or a merged ``LowRankLinear``'s first ``r0`` factors
    (exactly), with the LoRA re-attached."""
    _check_format(adapter)
    out = train.copy_model(model)
    linears = linear_paths(out)
    for path, entry in adapter["sites"].items():
        if entry.get("kind") != "lora":
            continue
        module = _base_at(out, path, entry, linears)
        rank, t = int(entry["rank"]), entry["tensors"]
        if isinstance(module, LowRankLinear) and module.rank > rank:  # [D | A] [U ; s B] -> D U
            F.set_module(out, path, low_rank_linear(module.down.kernel[:, :-rank], module.up.kernel[:-rank],
                                                    module.up.bias, module.dtype))
        elif isinstance(module, nnx.Linear):
            delta = (float(entry["alpha"]) / rank) * (jnp.asarray(t["lora_a"]) @ jnp.asarray(t["lora_b"]))
            kernel = module.kernel.get_value()
            module.kernel.set_value((kernel.astype(jnp.float32) - delta).astype(kernel.dtype))
        else:
            raise PeftError(f"{path} is a {type(module).__name__}; unmerge takes a model merged by peft.merge "
                            "(a plain nnx.Linear or a LowRankLinear of higher rank at every LoRA site)")
    _attach(out, adapter)
    return out


# ----------------------------------------------------------------------------- our file
def save_adapter(model, path, *, head: bool = False) -> str:
    """Write the LoRA / adapter tensors of ``model`` (with ``head``, also its head's) to one
    ``.safetensors`` file, the settings in its header; returns ``path``."""
    from safetensors.numpy import save_file

    state = adapter_state(model, head=head)
    tensors, sites = {}, {}
    for site, entry in state["sites"].items():
        sites[site] = {**{k: v for k, v in entry.items() if k != "tensors"}, "tensors": sorted(entry["tensors"])}
        tensors.update({f"{site}.{name}": arr for name, arr in entry["tensors"].items()})
    heads = state.get("head", {})
    tensors.update(heads)
    meta = {"format": FORMAT, "sites": sites, "head": sorted(heads)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata={METADATA_KEY: json.dumps(meta), "format": "np"})
    return path


def read_adapter(path) -> dict:
    """The `adapter_state` dict saved by `save_adapter` at ``path``."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter file at {path}")
    with safe_open(path, "np") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
        if meta is None:
            raise PeftError(f"{path} has no {METADATA_KEY!r} header, so save_adapter did not write it (a HF PEFT "
                            "directory loads with load_peft_dir)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta)
    if info.get("format") != FORMAT:
        raise PeftError(f"{path}: adapter format {info.get('format')!r}; this version reads {FORMAT!r}")
    sites = {site: {**{k: v for k, v in entry.items() if k != "tensors"},
                    "tensors": {name: tensors[f"{site}.{name}"] for name in entry["tensors"]}}
             for site, entry in info["sites"].items()}
    state = {"format": info["format"], "sites": sites}
    if info.get("head"):
        state["head"] = {name: tensors[name] for name in info["head"]}
    return state


def load_adapter(model, path):
    """A copy of ``model`` with the adapter saved by `save_adapter` attached (see
    `attach_adapter` for the errors)."""
    return attach_adapter(model, read_adapter(path))


# ----------------------------------------------------------------------------- HF PEFT directory
def _hf_names(model) -> dict[str, tuple[str, bool, bool]]:
    """Our parameter path -> (full HF tensor name, transpose?, fused?) in the family's HF
    layout, with the task model's prefix as `efficient_nlp.models.save_hf_checkpoint` writes it."""
    out = {}
    for name, (ours, transpose) in models.hf_name_map(model).items():
        full = hf_tensor_name(model, name)
        for path in ours if isinstance(ours, tuple) else (ours,):
            out[path] = (full, transpose, isinstance(ours, tuple))
    return out


def _task_type(model) -> str | None:
    if isinstance(model, models.BertForSequenceClassification):
        return "SEQ_CLS"
    if isinstance(model, models.DecoderForCausalLM):
        return "CAUSAL_LM"
    if isinstance(model, (models.BertModel, models.DecoderModel)):
        return "FEATURE_EXTRACTION"
    return None


def _target_modules(targets: list[str], universe) -> list[str]:
    """The shortest PEFT ``target_modules``: the last names of the targets when they select
    exactly the targets among ``universe`` (PEFT matches them as suffixes), else the full names."""
    last = sorted({t.rsplit(".", 1)[-1] for t in targets})
    chosen = {m for m in universe if m.rsplit(".", 1)[-1] in last}
    return last if chosen == set(targets) else list(targets)


def _hf_module(names, path: str) -> str:
    """The HF module of our Linear at ``path`` (PeftError when PEFT cannot name it)."""
    entry = names.get(path + ".kernel")
    if entry is None or not entry[0].endswith(".weight"):
        raise PeftError(f"{path} has no HF module in its family's layout; save it with save_adapter")
    if entry[2]:
        raise PeftError(f"{path} is one part of the fused HF tensor {entry[0]} (q, k and v in one matrix); a PEFT "
                        "LoRA there would span all three: save it with save_adapter instead")
    return entry[0][: -len(".weight")]


def save_peft_dir(model, out_dir, base_model_name_or_path: str = "", *, head: bool = True) -> str:
    """Write the LoRA of ``model`` as a HF PEFT directory (module docstring); with ``head`` its
    head modules go in as ``modules_to_save``.  Returns ``out_dir``.

    Raises `PeftError` for adapters (PEFT's LoRA format holds LoRA only), LoRAs of different
    rank / alpha / dropout (PEFT's config holds one of each) and sites without their own HF
    module (GPT-2's fused q / k / v): `save_adapter` writes all of those."""
    from safetensors.numpy import save_file

    state = adapter_state(model, head=head)
    other = [p for p, e in state["sites"].items() if e["kind"] != "lora"]
    if other:
        raise PeftError(f"{other[0]} holds a {state['sites'][other[0]]['kind']}; HF PEFT's LoRA directory holds "
                        "LoRA only: save the model with save_adapter")
    settings = {(e["rank"], e["alpha"], e["dropout"]) for e in state["sites"].values()}
    if len(settings) > 1:
        raise PeftError(f"a PEFT config holds one (r, lora_alpha, lora_dropout); this model's LoRAs have "
                        f"{sorted(settings)}: save it with save_adapter")
    (rank, alpha, dropout), = settings
    names = _hf_names(model)
    tensors, targets, fan_in_fan_out = {}, [], set()
    for path, entry in state["sites"].items():
        module = _hf_module(names, path)
        targets.append(module)
        fan_in_fan_out.add(not names[path + ".kernel"][1])
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = entry["tensors"]["lora_a"].T
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = entry["tensors"]["lora_b"].T
    if len(fan_in_fan_out) > 1:
        raise PeftError("the targets mix torch Linear and Conv1D layouts, which one PEFT config cannot describe")
    save_modules = []
    for name, arr in state.get("head", {}).items():
        if name not in names or names[name][2]:
            raise PeftError(f"the head parameter {name} has no HF tensor of its own; save with head=False or "
                            "use save_adapter(..., head=True)")
        full, transpose, _ = names[name]
        tensors[PEFT_PREFIX + full] = arr.T if transpose else arr
        module = full.rsplit(".", 1)[0]
        if module not in save_modules:
            save_modules.append(module)
    universe = {full.rsplit(".", 1)[0] for full, _, _ in names.values()}
    config = {"peft_type": "LORA", "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
              "target_modules": _target_modules(targets, universe), "bias": "none",
              "fan_in_fan_out": fan_in_fan_out.pop(), "modules_to_save": save_modules or None,
              "task_type": _task_type(model), "base_model_name_or_path": base_model_name_or_path or None,
              "init_lora_weights": True, "inference_mode": True}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, PEFT_WEIGHTS),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def _peft_config(directory: str) -> dict:
    path = os.path.join(directory, PEFT_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {PEFT_CONFIG} in {directory}: not a PEFT adapter directory")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise PeftError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise PeftError(f"{path}: unsupported LoRA options {unsupported}; plain LoRA (one r and lora_alpha, "
                        "bias 'none') loads")
    return config


def load_peft_dir(model, directory):
    """A copy of ``model`` with the LoRA of a HF PEFT directory attached (and its
    ``modules_to_save`` tensors loaded into the head).  PeftError naming the tensor for one this
    model cannot place, or for unsupported options (DoRA, rsLoRA, per-module ranks, biases)."""
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    config = _peft_config(directory)
    tensors = load_file(os.path.join(directory, PEFT_WEIGHTS))
    names = _hf_names(model)
    ours = {full: path for path, (full, _, fused) in names.items() if not fused}
    rank, alpha, dropout = int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0)
    sites, head = {}, {}
    for key, arr in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        if name is None or (name not in ours and not name.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise PeftError(f"{directory}: tensor {key} names no parameter of this {type(model).__name__}")
        if name.endswith(".lora_B.weight"):
            continue
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            param = ours.get(module + ".weight")
            if param is None:
                raise PeftError(f"{directory}: the LoRA on {module} targets a module this {type(model).__name__} "
                                "lacks")
            path = param[: -len(".kernel")]
            b = tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
            if b is None:
                raise PeftError(f"{directory}: {module} has lora_A but no lora_B")
            sites[path] = {"kind": "lora", "rank": rank, "alpha": alpha, "dropout": dropout,
                           "in_features": int(arr.shape[1]), "out_features": int(b.shape[0]),
                           "tensors": {"lora_a": arr.T, "lora_b": b.T}}
        else:
            transpose = names[ours[name]][1]
            head[ours[name]] = arr.T if transpose else arr
    if not sites:
        raise PeftError(f"{directory}: {PEFT_WEIGHTS} holds no lora_A / lora_B tensors")
    state = {"format": FORMAT, "sites": sites}
    if head:
        state["head"] = head
    return attach_adapter(model, state)


__all__ = ["FORMAT", "PEFT_CONFIG", "PEFT_WEIGHTS", "adapter_state", "attach_adapter", "load_adapter",
           "load_peft_dir", "read_adapter", "save_adapter", "save_peft_dir", "unmerge"]
