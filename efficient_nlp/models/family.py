"""Model families: the one description of a model layout that every transform reads.

A transform (quantization, integer export, cost, REM / MREM, pruning patterns, shrink,
slimming, LayerDrop, few-shot pruning, distillation, Theseus, NAS spaces) never names a
parameter path of a particular model.  It asks the model's `Family` instead:

    fam = family.family_of(model)
    family.sites(model)                 # [Site(layer=0, role="q", path="bert.encoder.layers.0.attention.query"), ...]
    family.site_path(model, 3, "ffn_out")
    family.head_layout(model, 3)        # HeadLayout(num_heads=12, num_kv_heads=12, head_dim=32)
    h = family.embed(model, batch)      # the first layer's input
    h, inter = family.run_layers(model, h, batch["attention_mask"], start=2, stop=4, capture=("ffn_out",))
    logits = family.head(model, h)
    small = family.resized(model, layers=[0, 2], heads=[[0, 1], [3]], neurons=[[...], [...]])

Roles of the matmul sites (`LAYER_ROLES`): ``q``, ``k``, ``v`` (attention projections, heads
along the output axis), ``o`` (attention output, heads along the input axis), ``ffn_in`` and
``ffn_gate`` (neurons along the output axis; ``ffn_gate`` only for gated FFNs), ``ffn_out``
(neurons along the input axis); model-level roles ``embed`` (the word embedding) and
``classifier`` / ``lm_head`` (the head's modules, `head_paths`).

A family is one file in ``efficient_nlp/models/families/``: its `Family` entry (layout, HF
config translation, HF weight map) registered with `register`.  A family that lacks something a
transform needs fails with `FamilyError` naming what is missing.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out")
MODEL_ROLES = ("embed", "classifier", "lm_head")
#: Roles whose kernel holds one unit (head / neuron) per block of output columns; the others of
#: `LAYER_ROLES` hold them along the input rows.
OUTPUT_UNIT_ROLES = ("q", "k", "v", "ffn_in", "ffn_gate")
HEAD_ROLES = ("q", "k", "v", "o")
NEURON_ROLES = ("ffn_in", "ffn_gate", "ffn_out")


class FamilyError(ValueError):
    """A model or checkpoint whose family is unknown, or a family that lacks what a transform needs."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One matmul site of a layer: ``path`` is the dotted module path of its Linear."""

    layer: int
    role: str
    path: str


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Family:
    """The layout of one model family (see the module docstring).

    Attributes:
      name: family name (also the model's ``config.model_type``).
      model_types: HF ``model_type`` values this family reads.
      layers: dotted path from the model to its list of layers (``{backbone}`` is replaced by
        the backbone attribute, the family name).
      layer_sites: role -> module path inside a layer (roles of `LAYER_ROLES` it has).
      site_inputs: role -> the capture name (`efficient_nlp.models.CAPTURE_NAMES`) whose
        per-layer entry is the input of that site; ``hidden_states`` means the layer's input.
      attention: module path inside a layer of the attention module (``matmul_quant`` hook).
      unsigned_input_roles: roles whose input is mostly non-negative (after GELU / ReLU): an
        asymmetric activation quantizer suits them.
      embeddings: path of the embedding module (``{backbone}`` replaced).
      word_embedding: path of the word-embedding ``nnx.Embed``.
      head_modules: paths of the modules after the layer stack, in order; absent ones (a bare
        encoder has no classifier) are skipped by `head_paths`.
      config_from_hf: HF ``config.json`` dict -> dict in BERT's names (for `BertConfig.from_dict`).
      config_to_hf: (config, architecture) -> HF ``config.json`` dict.
      hf_map: model -> {HF tensor name without the base prefix: (our param path, transpose?)}.
      hf_prefix: prefix of the base model's tensors in task checkpoints (``"roberta."``).
      hf_head_groups: HF name prefixes of optional heads -> display name (fresh when missing).
      hf_ignored: regex of checkpoint tensors that are never parameters (buffers, tied copies).
      architectures: our model class name -> HF architecture name.
      kind: ``"encoder"`` (`efficient_nlp.models.BertConfig`, bidirectional) or ``"decoder"``
        (`efficient_nlp.models.DecoderConfig`, causal).
      site_norms: role -> path inside a layer of the norm whose output is that site's input and
        nothing else (pre-norm layers); one-shot smoothing folds input scales into it.  Empty for
        post-norm families, where the norm's output also feeds the residual.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    layer_sites: Mapping[str, str]
    site_inputs: Mapping[str, str]
    attention: str
    unsigned_input_roles: tuple[str, ...]
    embeddings: str
    word_embedding: str
    head_modules: tuple[str, ...]
    config_from_hf: Callable[[dict], dict]
    config_to_hf: Callable[[Any, str], dict]
    hf_map: Callable[[Any], dict]
    hf_prefix: str
    hf_head_groups: Mapping[str, str]
    hf_ignored: str
    architectures: Mapping[str, str]
    kind: str = "encoder"
    site_norms: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.layer_sites) - set(LAYER_ROLES))
        if unknown:
            raise FamilyError(f"family {self.name!r}: unknown role(s) {unknown}; roles are {LAYER_ROLES}")
        no_input = sorted(set(self.layer_sites) - set(self.site_inputs))
        if no_input:
            raise FamilyError(f"family {self.name!r}: site_inputs lacks role(s) {no_input}")

    def path(self, template: str) -> str:
        return template.replace("{backbone}", self.name)

    def require(self, *roles: str, what: str = "this transform") -> None:
        """Raise `FamilyError` unless the family has every role in ``roles``."""
        missing = [r for r in roles if r not in self.layer_sites]
        if missing:
            raise FamilyError(f"{what} needs the role(s) {missing}, which family {self.name!r} does not "
                              f"describe (it has {sorted(self.layer_sites)})")


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (keyed by its name); returns it."""
    _FAMILIES[family.name] = family
    return family


def _load_builtin() -> None:
    if not _FAMILIES:
        from efficient_nlp.models import families  # noqa: F401  (registers the built-in families)


def families() -> dict[str, Family]:
    """All registered families by name."""
    _load_builtin()
    return dict(_FAMILIES)


def get_family(name: str) -> Family:
    _load_builtin()
    if name not in _FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def family_for_config(d: Mapping) -> Family:
    """The family that reads a HF ``config.json`` dict (by its ``model_type``; none = BERT)."""
    _load_builtin()
    model_type = d.get("model_type") or "bert"
    for fam in _FAMILIES.values():
        if model_type in fam.model_types or model_type == fam.name:
            return fam
    readable = sorted(t for f in _FAMILIES.values() for t in f.model_types)
    raise FamilyError(f"config.json has model_type={model_type!r}, which no model family reads; "
                      f"supported model types: {readable}")


def family_of(model) -> Family:
    """The `Family` of a model instance (from ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    name = getattr(config, "model_type", None)
    if name is None:
        raise FamilyError(f"{type(model).__name__} has no config.model_type, so no family describes it; "
                          "transforms that read a model family work on models built by efficient_nlp.models")
    return get_family(name)


# ----------------------------------------------------------------------------- module access
def get_module(model, path: str):
    """The submodule at a dotted ``path`` (integers index lists)."""
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def set_module(model, path: str, new) -> None:
    """Replace the submodule at ``path``."""
    parent_path, _, last = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def layer_stack(model):
    """The model's list of layers (an ``nnx.List``)."""
    return get_module(model, family_of(model).path(family_of(model).layers))


def num_layers(model) -> int:
    return len(layer_stack(model))


def layer_path(model, i: int) -> str:
    """Dotted path of layer ``i`` (``bert.encoder.layers.3``)."""
    fam = family_of(model)
    return f"{fam.path(fam.layers)}.{i}"


def site_path(model, i: int, role: str) -> str:
    """Dotted module path of the ``role`` Linear of layer ``i``."""
    fam = family_of(model)
    fam.require(role, what=f"site {role!r}")
    return f"{layer_path(model, i)}.{fam.layer_sites[role]}"


def sites(model, roles=LAYER_ROLES, *, unique: bool = False) -> list[Site]:
    """Every matmul site of the layer stack with a role in ``roles``, layer by layer, each layer
    in the order of `LAYER_ROLES` (roles the family lacks are skipped).  ``unique``: each module
    once, so a layer that several positions share (`efficient_nlp.sharing`) gives its sites at
    its first position only (for transforms that replace modules: wrapping twice is wrong)."""
    fam = family_of(model)
    out = [Site(i, r, f"{layer_path(model, i)}.{fam.layer_sites[r]}")
           for i in range(num_layers(model)) for r in LAYER_ROLES if r in roles and r in fam.layer_sites]
    if not unique:
        return out
    seen, kept = set(), []
    for site in out:
        key = id(get_module(model, site.path))
        if key not in seen:
            seen.add(key)
            kept.append(site)
    return kept


def _parse_site(fam: Family, path: str) -> Site | None:
    stack = fam.path(fam.layers)
    m = re.fullmatch(rf"{re.escape(stack)}\.(\d+)\.(.+?)(\.kernel|\.bias)?", path)
    if not m:
        return None
    for role, sub in fam.layer_sites.items():
        if sub == m.group(2):
            return Site(int(m.group(1)), role, f"{stack}.{m.group(1)}.{sub}")
    return None


def site_of(model, path: str) -> Site | None:
    """The `Site` of a module path (a trailing ``.kernel`` / ``.bias`` is allowed), else None."""
    return _parse_site(family_of(model), path)


def find_site(path: str) -> Site | None:
    """`site_of` without a model: the path is read in the layout of every registered family
    (for site names that carry no model, e.g. a quantization report's)."""
    for fam in families().values():
        site = _parse_site(fam, path)
        if site is not None:
            return site
    return None


def attention_path(model, i: int) -> str:
    """Path of layer ``i``'s attention module (the one with the ``matmul_quant`` hook)."""
    return f"{layer_path(model, i)}.{family_of(model).attention}"


def embeddings_path(model) -> str:
    fam = family_of(model)
    return fam.path(fam.embeddings)


def word_embedding_path(model) -> str:
    fam = family_of(model)
    return fam.path(fam.word_embedding)


def head_paths(model) -> tuple[str, ...]:
    """Paths of the modules after the layer stack that this model has (pooler, classifier ...)."""
    fam = family_of(model)
    out = []
    for template in fam.head_modules:
        path = fam.path(template)
        try:
            if get_module(model, path) is not None:
                out.append(path)
        except AttributeError:
            continue
    return tuple(out)


def site_input(model, role: str) -> str:
    """Capture name whose per-layer entry feeds the ``role`` site (see `Family.site_inputs`)."""
    fam = family_of(model)
    fam.require(role, what=f"the input of site {role!r}")
    return fam.site_inputs[role]


def head_layout(model, i: int = 0) -> HeadLayout:
    """Heads, KV heads and head width of layer ``i`` (read from its kernels, so physically
    pruned layers report what they hold)."""
    d = model.config.attention_head_dim
    q = _out_features(get_module(model, site_path(model, i, "q")))
    k = _out_features(get_module(model, site_path(model, i, "k")))
    return HeadLayout(q // d, k // d, d)


def _out_features(linear) -> int:
    """Output width of a Linear or of a module standing in for one (quantized, factorised, LoRA)."""
    width = getattr(linear, "out_features", None)
    return int(width) if width is not None else int(np.shape(linear.kernel.get_value())[-1])


def num_neurons(model, i: int) -> int:
    """FFN width of layer ``i`` (rows of its ``ffn_out`` kernel)."""
    return int(np.shape(get_module(model, site_path(model, i, "ffn_out")).kernel.get_value())[0])


# ----------------------------------------------------------------------------- running pieces
def embed(model, batch: Mapping, *, deterministic: bool = True, rngs=None):
    """The first layer's input for a tokenised ``batch`` (``input_ids``, ``token_type_ids``)."""
    return model.embed(batch["input_ids"], batch.get("token_type_ids"), deterministic=deterministic, rngs=rngs)


def run_layers(model, hidden, attention_mask=None, *, start: int = 0, stop: int | None = None, **kwargs):
    """Layers ``start .. stop-1`` on ``hidden`` -> ``(hidden, intermediates)`` (``capture``,
    ``deterministic``, ``rngs``, ``layer_drop`` as in the model's encoder)."""
    return model.run_layers(hidden, attention_mask, start=start, stop=stop, **kwargs)


def head(model, hidden, *, deterministic: bool = True, rngs=None):
    """The last layer's output -> logits (None for a bare encoder)."""
    return model.head(hidden, deterministic=deterministic, rngs=rngs)


def forward(model, batch: Mapping, **kwargs):
    """``model(input_ids, attention_mask, token_type_ids, **kwargs)`` from a batch dict."""
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), **kwargs)


# ----------------------------------------------------------------------------- smaller instances
def _head_columns(heads, d) -> np.ndarray:
    return np.asarray([c for h in heads for c in range(h * d, (h + 1) * d)], dtype=int)


def resized_config(config, layers, heads, neurons, kv_heads=None):
    """The config of `resized` (per-layer head counts and FFN widths pinned; with grouped-query
    attention also the per-layer key/value heads, ``kv_heads``: kept KV heads per kept layer,
    default one group of ``num_attention_heads / num_key_value_heads`` query heads each)."""
    changes = dict(num_hidden_layers=len(layers), head_dim=config.attention_head_dim,
                   layer_num_attention_heads=tuple(len(h) for h in heads),
                   layer_intermediate_sizes=tuple(len(n) for n in neurons))
    if hasattr(config, "layer_num_key_value_heads"):
        group = config.num_attention_heads // config.num_kv_heads
        changes["layer_num_key_value_heads"] = (tuple(len(k) for k in kv_heads) if kv_heads is not None
                                                else tuple(len(h) // group for h in heads))
    return config.replace(**changes)


def kv_groups(model, i: int, heads) -> list[int]:
    """The key/value heads serving query ``heads`` of layer ``i``; raises ValueError unless the
    heads are whole groups (grouped-query attention prunes a KV head with all its query heads)."""
    layout = head_layout(model, i)
    if layout.num_kv_heads == layout.num_heads:
        return [int(h) for h in heads]
    group = layout.num_heads // max(layout.num_kv_heads, 1)
    kept = sorted({int(h) // group for h in heads})
    if sorted(int(h) for h in heads) != [g * group + j for g in kept for j in range(group)]:
        raise ValueError(f"layer {i} has grouped-query attention ({layout.num_heads} query heads share "
                         f"{layout.num_kv_heads} key/value heads, {group} each): keep or remove whole groups "
                         f"of query heads [g*{group} .. g*{group}+{group - 1}], got heads {sorted(heads)}")
    return kept


def resized(model, *, layers=None, heads=None, neurons=None, params: Mapping | None = None):
    """A smaller instance of ``model``'s class keeping the given units; ``model`` is unchanged.

    ``layers``: kept layer indices (default all); ``heads`` / ``neurons``: per KEPT layer, the
    kept head / FFN-neuron indices (default all of that layer).  With grouped-query attention
    the kept query heads must be whole groups (`kv_groups`); their key/value heads are kept.  A
    head's q/k/v columns and biases and its o rows, a neuron's ffn_in (and ffn_gate) column and bias and its ffn_out row
    are copied; everything else is copied whole.  ``params``: optional ``{path: array}`` to copy
    from instead of the model's own values (e.g. masked weights).
    """
    from efficient_nlp.models.hf_checkpoint import named_params

    fam = family_of(model)
    fam.require(*(r for r in ("q", "k", "v", "o", "ffn_in", "ffn_out")), what="resizing a model")
    n = num_layers(model)
    layers = list(range(n)) if layers is None else [int(i) for i in layers]
    if not layers:
        raise ValueError("a model needs at least one layer; every layer would be removed")
    heads = [list(range(head_layout(model, i).num_heads)) for i in layers] if heads is None else heads
    neurons = [list(range(num_neurons(model, i))) for i in layers] if neurons is None else neurons
    if not len(layers) == len(heads) == len(neurons):
        raise ValueError(f"need one head list and one neuron list per kept layer ({len(layers)}), "
                         f"got {len(heads)} and {len(neurons)}")
    values = dict(params) if params is not None else {
        k: v.get_value() for k, v in named_params(model).items()}
    d = model.config.attention_head_dim
    kv_heads = [kv_groups(model, i, h) for i, h in zip(layers, heads)]
    new_cfg = resized_config(model.config, layers, heads, neurons, kv_heads)
    kwargs = {}
    pooler = getattr(model.backbone, "pooler", None) if hasattr(model, "backbone") else None
    if type(model).__name__ == "BertModel" and pooler is None:
        kwargs["add_pooling_layer"] = False
    dtype = jnp.asarray(next(iter(values.values()))).dtype
    small = nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0), param_dtype=dtype, **kwargs))
    stack = fam.path(fam.layers) + "."
    role_of = {sub: role for role, sub in fam.layer_sites.items()}
    for name, var in named_params(small).items():
        src, value = name, None
        if name.startswith(stack):
            new_i, rest = name[len(stack):].split(".", 1)
            old_i = layers[int(new_i)]
            src = f"{stack}{old_i}.{rest}"
            sub, _, leaf = rest.rpartition(".")
            role = role_of.get(sub)
            a = np.asarray(jax.device_get(values[src]))
            if role is not None:
                kept = kv_heads[int(new_i)] if role in ("k", "v") else heads[int(new_i)]
                idx = (_head_columns(kept, d) if role in HEAD_ROLES
                       else np.asarray(neurons[int(new_i)], dtype=int))
                if role in OUTPUT_UNIT_ROLES:
                    value = a[..., idx] if leaf == "kernel" else a[idx]
                elif leaf == "kernel":
                    value = a[idx, :]
        if value is None:
            value = np.asarray(jax.device_get(values[src]))
        want = tuple(var.get_value().shape)
        if tuple(np.shape(value)) != want:  # pragma: no cover - internal consistency
            raise AssertionError(f"resized: {name} has shape {np.shape(value)}, expected {want}")
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    return small


__all__ = [
    "Family", "FamilyError", "HEAD_ROLES", "HeadLayout", "LAYER_ROLES", "MODEL_ROLES", "NEURON_ROLES",
    "OUTPUT_UNIT_ROLES", "Site", "attention_path", "embed", "embeddings_path", "families", "family_for_config", "find_site",
    "family_of", "forward", "get_family", "kv_groups", "get_module", "head", "head_layout", "head_paths", "layer_path",
    "layer_stack", "num_layers", "num_neurons", "register", "resized", "resized_config", "run_layers",
    "set_module", "site_input", "site_of", "site_path", "sites", "word_embedding_path",
]
