"""LayerDrop (Fan et al. 2020; docs/pruning.md): drop whole layers at random while training, then
remove layers on demand.

Training: `with_layer_drop` sets the ``layer_drop`` rate of the module that runs the model's
layer stack (the owner of the family's `Family.layers`, e.g. the encoder, which draws one
Bernoulli per layer from the ``dropout`` stream and passes a dropped layer's input through), so
any loss that calls the model with ``deterministic=False`` (e.g. the fine-tuning ``task_loss``)
trains with LayerDrop; evaluation (``deterministic=True``) runs every layer.

Pruning: `remove_layers` keeps a given set of layers (`every_other`: the layers ``offset,
offset + k, ...``, the paper's "every other layer" strategy) and builds a smaller model of the
same family with `shrink` (layer removal is part of its structure).  The smaller model computes
exactly what the full model computes with the removed layers skipped
(``layer_drop`` = 1 on them, 0 elsewhere).
"""
from __future__ import annotations

from efficient_nlp.models import family as F
from efficient_nlp.models.bert import drop_rates
from efficient_nlp.prune.shrink import full_structure, shrink


def _stack_owner(model):
    """The module holding the model's layer stack (it runs the layers and reads ``layer_drop``)."""
    fam = F.family_of(model)
    owner = F.get_module(model, fam.path(fam.layers).rpartition(".")[0])
    if not hasattr(owner, "layer_drop"):
        raise F.FamilyError(f"family {fam.name!r}: the owner of its layer stack ({type(owner).__name__}) "
                            "has no layer_drop rate, so LayerDrop cannot be set")
    return owner


def with_layer_drop(model, rate):
    """Sets LayerDrop ``rate`` (float, or one per layer) on the module that runs ``model``'s
    layers; returns ``model``."""
    owner = _stack_owner(model)
    drop_rates(rate, F.num_layers(model))  # validates
    owner.layer_drop = float(rate) if isinstance(rate, (int, float)) else tuple(float(r) for r in rate)
    return model


def every_other(num_layers: int, k: int = 2, offset: int = 0) -> list[int]:
    """Layers ``offset, offset + k, ...`` below ``num_layers`` (k=2: keep every other layer)."""
    if k < 1 or not 0 <= offset < num_layers:
        raise ValueError(f"every_other needs k >= 1 and 0 <= offset < {num_layers}, got k={k}, offset={offset}")
    return list(range(offset, num_layers, k))


def skip_rates(num_layers: int, keep) -> tuple:
    """Per-layer ``layer_drop`` rates that skip every layer not in ``keep`` (1.0) and run the rest."""
    keep = set(keep)
    return tuple(0.0 if i in keep else 1.0 for i in range(num_layers))


def remove_layers(model, keep):
    """``(smaller_model, structure)`` keeping only the layers ``keep`` (all their heads/neurons)."""
    st = full_structure(model)
    n = len(st["layers"])
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"remove_layers: keep must be a non-empty subset of 0..{n - 1}, got {keep}")
    small, st = shrink(model, structure={"layers": keep, "heads": [st["heads"][i] for i in keep],
                                         "neurons": [st["neurons"][i] for i in keep]})
    return small, st
