"""Progressive stacking: grow a trained shallow model into a deeper one by copying its layers.

Gong et al. (2019, "Efficient Training of BERT by Progressively Stacking") observe that the
attention patterns of a trained BERT's upper layers resemble those of its lower layers, and
train a deep model in stages: train an L-layer model, then build a 2L-layer model whose layer
``i + L`` starts as an exact copy of layer ``i`` (``i < L``), keep the embeddings and the
heads, and go on training (e.g. 3 -> 6 -> 12 layers).  Written as a map on the layer list
``(f_0, ..., f_{L-1})`` of the model ``head o f_{L-1} o ... o f_0 o embed``, the grown model is

    head o (f_{L-1} o ... o f_0) o (f_{L-1} o ... o f_0) o embed,

so it runs the trained stack twice.  `stack_layers` builds that model for any family
(`efficient_nlp.models.family`); ``times=k`` gives ``k * L`` layers, layer ``j`` a copy of
layer ``j mod L``.

To carry the optimizer along (Adam's first and second moments of the copied layers are the
source layer's, the update count is kept), `stack_tree` applies the same copy to any pytree
laid out like the model's parameters (``nnx.State`` or a plain nested dict), and
`stack_opt_state` to every parameter-shaped part of an optax state, which it finds by
structure: a mapping whose keys are exactly the layer numbers ``0 .. L-1``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.models import family as F


# ----------------------------------------------------------------------------- helpers
def _copy_leaf(x):
    """A copy of an array in a new buffer (so no two leaves of a grown tree alias one buffer,
    which donation forbids); other leaves unchanged."""
    if isinstance(x, jax.Array):
        return jnp.array(x, copy=True)
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def _check_times(times) -> int:
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ValueError(f"times must be an int >= 1 (the grown model has times * L layers; Gong et al. "
                         f"use 2), got {times!r}")
    return times


def stacked_config(config, times: int = 2):
    """``config`` with ``times`` times the layers: ``num_hidden_layers`` multiplied and every
    per-layer size tuple (``layer_num_attention_heads`` ...) repeated ``times`` times."""
    _check_times(times)
    n = config.num_hidden_layers
    changes = {"num_hidden_layers": n * times}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name.startswith("layer_") and isinstance(value, (tuple, list)):
            changes[field.name] = tuple(value) * times
    return config.replace(**changes)


def _is_family_model(node) -> bool:
    if not isinstance(node, nnx.Module):
        return False
    try:
        F.layer_stack(node)
    except (F.FamilyError, AttributeError):
        return False
    return True


def _family_models(model) -> list[tuple[tuple, Any]]:
    """``(path, module)`` of the outermost family models inside ``model`` (``model`` itself
    when it is one): those whose layers `stack_layers` grows."""
    if _is_family_model(model):
        return [((), model)]
    found = sorted(((tuple(p), node) for p, node in nnx.iter_graph(model) if _is_family_model(node)),
                   key=lambda item: len(item[0]))
    outer = []
    for path, node in found:
        if not any(path[:len(p)] == p for p, _ in outer):
            outer.append((path, node))
    if not outer:
        raise F.FamilyError(f"{type(model).__name__} is not a model of a registered family and holds none "
                            "(a module with a config.model_type and that family's layer list); stack a model "
                            "built by efficient_nlp.models")
    return outer


def layer_stack_paths(model) -> tuple[str, ...]:
    """Dotted paths (as in the model's ``nnx.State``) of the layer lists `stack_layers` grows:
    ``("bert.encoder.layers",)`` for a BERT; one per family model held by a container (a
    generator and a discriminator).  Pass them as ``paths`` to `stack_tree` / `stack_opt_state`
    to grow those lists only."""
    out = []
    for path, sub in _family_models(model):
        fam = F.family_of(sub)
        out.append(".".join([str(p) for p in path] + [fam.path(fam.layers)]))
    return tuple(out)


# ----------------------------------------------------------------------------- the model
def _grow(sub, times: int) -> None:
    """Grow family model ``sub`` in place: its layer list repeated ``times`` times (cloned
    modules) and its config updated."""
    fam = F.family_of(sub)
    stack_path = fam.path(fam.layers)
    layers = list(F.layer_stack(sub))
    n = len(layers)
    if sub.config.num_hidden_layers != n:
        raise ValueError(f"{type(sub).__name__} holds {n} layers but its config says num_hidden_layers="
                         f"{sub.config.num_hidden_layers}; stack a consistent model")
    grown = list(layers)
    for _ in range(times - 1):
        grown.extend(nnx.clone(nnx.List(layers)))  # one clone per repetition keeps sharing among layers
    F.set_module(sub, stack_path, nnx.List(grown))
    parent_path = stack_path.rpartition(".")[0]
    parent = F.get_module(sub, parent_path) if parent_path else sub
    rates = getattr(parent, "layer_drop", None)
    if isinstance(rates, (tuple, list)) and len(rates) == n:  # per-layer LayerDrop rates follow their layer
        parent.layer_drop = tuple(rates) * times
    sub.config = stacked_config(sub.config, times)


def stack_layers(model, *, times: int = 2):
    """A new model with ``times * L`` layers, layer ``j`` an exact copy of layer ``j mod L``
    (progressive stacking, Gong et al. 2019: ``times=2`` doubles the depth).

    Everything else (embeddings, the final norm, pooler and heads, the computation dtype and
    any module attribute) is copied as it is, so the grown model runs the trained layer stack
    ``times`` times in a row; the config says ``num_hidden_layers = times * L`` (per-layer size
    tuples repeated), so the model saves and loads like one built at that depth.  ``model`` may
    also be a container holding family models (an ELECTRA generator and discriminator that
    share embeddings): each is grown and shared modules stay shared.  ``model`` is unchanged
    and shares no buffer with the grown model (so a training loop may donate either).
    """
    _check_times(times)
    grown = nnx.clone(model)
    for _, sub in _family_models(grown):
        _grow(sub, times)
    for _, var in nnx.iter_graph(grown):
        if isinstance(var, nnx.Variable):
            var.set_value(_copy_leaf(var.get_value()))
    return grown


# ----------------------------------------------------------------------------- parameter-shaped trees
def _is_int_keyed(node) -> bool:
    return (isinstance(node, Mapping) and len(node) > 0
            and all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in node.keys()))


def _is_stack(node, n: int) -> bool:
    return _is_int_keyed(node) and sorted(int(k) for k in node.keys()) == list(range(n))


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _grow_mapping(node, n: int, times: int):
    items = {k: node[k] for k in sorted(node.keys(), key=int)}
    keys = list(items)
    key_type = type(keys[0])
    for j in range(n, n * times):
        items[key_type(j)] = jax.tree.map(_copy_leaf, items[keys[j % n]])
    try:
        return type(node)(items)
    except TypeError:  # a Mapping type that cannot be built from a dict: a plain dict instead
        return dict(items)


_DESCEND = object()


def _walk(node, path: tuple, visit):
    """Rebuild ``node`` top-down: ``visit(path, node)`` returns a replacement, or `_DESCEND` to
    rebuild the node from its walked children (pytree nodes) or keep it (leaves)."""
    out = visit(path, node)
    if out is not _DESCEND:
        return out
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][0] == ():
        return node  # a leaf
    return jax.tree_util.tree_unflatten(treedef, [_walk(child, path + tuple(key), visit)
                                                  for key, child in children])


def _dotted(path) -> str:
    return ".".join(_key_name(k) for k in path)


def _stack(tree, num_layers: int, times: int, paths, *, what: str):
    """(grown tree, number of layer lists grown, sizes of other int-keyed mappings, whether the
    tree holds any mapping)."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int (the layers of the model the tree belongs to), "
                         f"got {num_layers!r}")
    _check_times(times)
    wanted = None if paths is None else tuple(str(p) for p in ([paths] if isinstance(paths, str) else paths))
    matched, other_sizes = set(), set()
    found = {"stacks": 0, "mappings": False}

    def visit(path, node):
        if isinstance(node, Mapping):
            found["mappings"] = True
        if wanted is not None:
            dotted = _dotted(path)
            hit = next((p for p in wanted if dotted == p or dotted.endswith("." + p)), None)
            if hit is None:
                return _DESCEND
            if not _is_stack(node, num_layers):
                keys = sorted(node.keys()) if isinstance(node, Mapping) else type(node).__name__
                raise ValueError(f"{what}: the subtree at {dotted} is not a list of {num_layers} layers "
                                 f"(keys 0 .. {num_layers - 1}); it has {keys}")
            matched.add(hit)
        elif not _is_stack(node, num_layers):
            if _is_int_keyed(node):
                other_sizes.add(len(node))
            return _DESCEND
        found["stacks"] += 1
        return _grow_mapping(node, num_layers, times)

    out = _walk(tree, (), visit)
    if wanted is not None:
        missing = [p for p in wanted if p not in matched]
        if missing:
            raise ValueError(f"{what}: found no subtree at {missing}; the paths are those of "
                             "layer_stack_paths(model) for the model the tree belongs to")
    return out, found["stacks"], sorted(other_sizes), found["mappings"]


def stack_tree(tree, num_layers: int, *, times: int = 2, paths: str | Iterable[str] | None = None):
    """The copy of `stack_layers` on a pytree laid out like the L-layer model's parameters
    (its ``nnx.State``, a plain nested dict, Adam's moments ...): each list of ``num_layers``
    layers (a mapping with keys exactly ``0 .. L-1``) becomes one of ``times * L`` entries,
    entry ``j`` a copy of entry ``j mod L`` (fresh buffers); everything else is kept as it is.

    ``paths``: dotted paths of the layer lists (`layer_stack_paths`); a subtree counts when its
    path ends with one of them (so they also find the moments inside an optimizer state).
    Default: every mapping keyed ``0 .. L-1``, found by structure.  Raises ValueError when no
    such list is found (wrong ``num_layers``, or not a parameter-shaped tree).
    """
    out, count, others, _ = _stack(tree, num_layers, times, paths, what="stack_tree")
    if not count:
        hint = f" (it has int-keyed lists of {others} entries)" if others else ""
        raise ValueError(f"stack_tree found no list of {num_layers} layers (a mapping keyed 0 .. "
                         f"{num_layers - 1}) in the tree{hint}; pass the params of the {num_layers}-layer model "
                         "(nnx.state(model, nnx.Param)) or a tree shaped like them, with its num_layers")
    return out


def stack_opt_state(opt_state, num_layers: int, *, times: int = 2, paths: str | Iterable[str] | None = None):
    """An optax state for the grown model from one built for the ``num_layers``-layer params.

    Every parameter-shaped part of the state (Adam's ``mu`` / ``nu``, a trace, a masked inner
    state ...) is grown with `stack_tree`, so the moments of layer ``i + L`` are copies of layer
    ``i``'s; everything else (update counts, schedule state, hyper-parameters) is kept.  The
    result has the structure of ``optimizer.init(grown_params)``.  The parts are found by
    structure (see `stack_tree`; ``paths`` narrows them), not by the optimizer's type, so any
    optax chain works; a state that holds no parameter-shaped part (plain SGD) is returned as
    it is.  Raises ValueError when the state holds parameter-shaped parts but no list of
    ``num_layers`` layers (the state of another model).
    """
    out, count, others, mappings = _stack(opt_state, num_layers, times, paths, what="stack_opt_state")
    if not count and mappings:
        hint = f"; it has int-keyed lists of {others} entries" if others else ""
        raise ValueError(f"stack_opt_state found parameter-shaped parts in the optimizer state but no list of "
                         f"{num_layers} layers (keys 0 .. {num_layers - 1}){hint}; pass the state built for the "
                         f"params of the {num_layers}-layer model being stacked")
    return out


__all__ = ["layer_stack_paths", "stack_layers", "stack_opt_state", "stack_tree", "stacked_config"]
