"""Cross-layer parameter sharing: N layer positions run M <= N unique layers.

ALBERT (Lan et al. 2020) runs one layer at every position; Takase & Kiyono 2021 ("Lessons on
Parameter Sharing across Layers in Transformers") assign M unique layers to N positions in
three ways (`assignment`, 0-based position i -> unique layer)::

    sequence   i // (N / M)                N=6, M=3: 0 0 1 1 2 2   (N divisible by M)
    cycle      i mod M                     N=6, M=3: 0 1 2 0 1 2
    cycle_rev  cycle, last block reversed  N=6, M=3: 0 1 2 2 1 0
    all        0 (ALBERT, M = 1)           N=6:      0 0 0 0 0 0

From a trained model, `share_layers` builds a copy whose layer stack holds the SAME module object
at every position mapped to one unique layer, initialised with the mean of those positions'
parameters (or the first position's); fine-tuning, or distillation from the unshared model,
then recovers accuracy.  Flax NNX keeps shared references through ``nnx.split`` / ``merge``,
so the model's state holds each unique layer once, ``train.run`` / ``train.fit`` train M layers
and the gradient of a shared parameter is the sum of its gradients at every position.

    shared, report = sharing.share_layers(model, 3, "cycle_rev")
    print(report)
    shared, _ = train.run(shared, loss_fn, optax.adamw(1e-4), batches, steps=1000)
    sharing.save(shared, "out/")            # a normal HF checkpoint (all N layers) + sharing.json
    again = sharing.load("out/", num_labels=2)

The assignment is kept on the model as ``model.layer_sharing`` (a `LayerSharing`; it survives
``nnx.clone`` / ``split`` / ``merge``).  Transforms that read parameters by position path see
a shared layer once, under its first position (`efficient_nlp.models.named_params`); `untie`
gives an unshared copy for them.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models, train
from efficient_nlp.models import family as F

MODES = ("all", "sequence", "cycle", "cycle_rev")
INITS = ("average", "first")
SHARING_NAME = "sharing.json"


@dataclasses.dataclass(frozen=True)
class LayerSharing:
    """Which unique layer runs at each position: ``assignment[i]`` in ``0 .. num_unique - 1``."""

    mode: str
    num_unique: int
    assignment: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SharingReport:
    """What `share_layers` did: N positions, M unique layers, the assignment, and the parameter
    count and stored bytes (each shared parameter once) before and after."""

    num_layers: int
    num_unique: int
    mode: str
    init: str
    assignment: tuple[int, ...]
    params_before: int
    params_after: int
    nbytes_before: int
    nbytes_after: int

    def __str__(self) -> str:
        return "\n".join([
            f"{self.mode}: {self.num_layers} positions -> {self.num_unique} unique layers ({self.init} init), "
            f"assignment {list(self.assignment)}",
            f"{'':<16}{'before':>14}{'after':>14}{'ratio':>8}",
            f"{'parameters':<16}{self.params_before:>14,}{self.params_after:>14,}"
            f"{self.params_after / self.params_before:>8.3f}",
            f"{'stored bytes':<16}{self.nbytes_before:>14,}{self.nbytes_after:>14,}"
            f"{self.nbytes_after / self.nbytes_before:>8.3f}"])


# ----------------------------------------------------------------------------- assignments
def assignment(num_layers: int, num_unique: int, mode: str) -> tuple[int, ...]:
    """Position -> unique layer for ``num_layers`` (N) positions and ``num_unique`` (M) layers.

    Takase & Kiyono 2021, section 2 (their positions are 1-based; these are 0-based):
      ``sequence``: ``i // (N / M)``: each unique layer runs at N / M consecutive positions
        (N must be divisible by M).
      ``cycle``: ``i mod M``: the M layers stacked in order, repeated.
      ``cycle_rev``: as ``cycle`` for the first ``max(M, M * (ceil(N / M) - 1))`` positions (the
        first M positions always run layers 0 .. M-1), then the remaining positions take the
        layers in reverse order, ``M-1, M-2, ...``.  When M divides N and N >= 2M: cycle for the
        first N - M positions, then ``M-1 ... 0``; M = N is the identity.
      ``all``: ALBERT's one layer everywhere; M must be 1.
    """
    n, m = int(num_layers), int(num_unique)
    if mode not in MODES:
        raise ValueError(f"unknown sharing mode {mode!r}; modes are {MODES}")
    if n < 1:
        raise ValueError(f"need at least one layer position, got num_layers={num_layers}")
    if not 1 <= m <= n:
        raise ValueError(f"num_unique must be in [1, {n}] (the number of layers), got {num_unique}")
    if mode == "all":
        if m != 1:
            raise ValueError(f"mode 'all' runs one layer at every position: num_unique must be 1, got {m} "
                             f"(for {m} unique layers use 'sequence', 'cycle' or 'cycle_rev')")
        return (0,) * n
    if mode == "sequence":
        if n % m:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(f"mode 'sequence' gives each unique layer N / M consecutive positions, so "
                             f"num_unique must divide the {n} layers; got {m}, valid: {divisors} "
                             "(or use 'cycle' / 'cycle_rev', which take any M)")
        return tuple(i // (n // m) for i in range(n))
    if mode == "cycle":
        return tuple(i % m for i in range(n))
    head = max(m, m * (-(-n // m) - 1))
    return tuple(i % m for i in range(head)) + tuple(m - 1 - j for j in range(n - head))


def _groups(assign) -> list[list[int]]:
    return [[p for p, u in enumerate(assign) if u == k] for k in range(max(assign) + 1)]


# ----------------------------------------------------------------------------- counting
def unique_param_count(model) -> int:
    """Parameters stored: every ``nnx.Param`` element once, a shared layer counted once (what
    ``efficient_nlp.prune.count_params`` and ``efficient_nlp.distill.num_params`` count)."""
    return train.count_params(model)


def param_count(model) -> int:
    """Parameters of the unshared model: a shared layer counted at every position it runs
    (the size of the HF checkpoint `save` writes)."""
    stack = F.layer_stack(model)
    layers = {id(layer): layer for layer in stack}
    per_position = sum(unique_param_count(layer) for layer in stack)
    return unique_param_count(model) + per_position - sum(unique_param_count(layer) for layer in layers.values())


def stored_nbytes(model) -> int:
    """Bytes of the parameters stored (each shared parameter once)."""
    return train.tree_bytes(nnx.state(model, nnx.Param))


# ----------------------------------------------------------------------------- sharing
def sharing_of(model) -> LayerSharing | None:
    """The `LayerSharing` of a model made by `share_layers` or `load`, else None."""
    return getattr(model, "layer_sharing", None)


def _layout(layer) -> dict[str, tuple]:
    return {k: (tuple(v.get_value().shape), jnp.dtype(v.get_value().dtype).name)
            for k, v in models.named_params(layer).items()}


def _check_shapes(layers, groups) -> None:
    for positions in groups:
        first = _layout(layers[positions[0]])
        for p in positions[1:]:
            other = _layout(layers[p])
            if other != first or nnx.graphdef(layers[p]) != nnx.graphdef(layers[positions[0]]):
                diff = [f"{k}: layer {positions[0]} {first.get(k)}, layer {p} {other.get(k)}"
                        for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)]
                raise ValueError(
                    f"layers {positions[0]} and {p} would share parameters but differ in "
                    + (f"shape: {'; '.join(diff[:8])}" if diff else "structure (modules wrapped differently)")
                    + ". Shared layers need one shape and structure: share before physical pruning or "
                    "wrapping, or choose num_unique / mode so that each unique layer's positions match")


def _mean(*xs):
    return jnp.mean(jnp.stack([jnp.asarray(x, jnp.float32) for x in xs]), axis=0).astype(xs[0].dtype)


def share_layers(model, num_unique: int, mode: str = "cycle", *, init: str = "average"):
    """A copy of ``model`` whose N layer positions run ``num_unique`` shared layers (module doc).

    Args:
      model: any family's model (left unchanged); its layers must be shaped alike within each
        group of positions that share (physically pruned layers of different width cannot).
      num_unique: M, the number of unique layers (1 <= M <= N).
      mode: one of `MODES` (see `assignment`).
      init: ``"average"``: unique layer u gets the element-wise mean (in float32) of the
        parameters of the positions mapped to it; ``"first"``: those of its first position.
        Variables other than parameters come from the first position.

    Returns:
      ``(shared_model, SharingReport)``; ``shared_model.layer_sharing`` holds the assignment.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; inits are {INITS}")
    n = F.num_layers(model)
    assign = assignment(n, num_unique, mode)
    groups = _groups(assign)
    shared = nnx.clone(model)
    stack = F.layer_stack(shared)
    layers = list(stack)
    _check_shapes(layers, groups)
    unique = []
    for positions in groups:
        layer = nnx.clone(layers[positions[0]])
        if init == "average" and len(positions) > 1:
            nnx.update(layer, jax.tree.map(_mean, *(nnx.state(layers[p], nnx.Param) for p in positions)))
        unique.append(layer)
    for p, u in enumerate(assign):
        stack[p] = unique[u]
    shared.layer_sharing = LayerSharing(mode, int(num_unique), assign)
    report = SharingReport(n, int(num_unique), mode, init, assign, unique_param_count(model),
                           unique_param_count(shared), stored_nbytes(model), stored_nbytes(shared))
    return shared, report


def untie(model):
    """An unshared copy of ``model``: an independent layer (equal values) at every position, and
    no ``layer_sharing`` (a plain model for transforms that work per position)."""
    plain = nnx.clone(model)
    stack = F.layer_stack(plain)
    for p in range(len(stack)):
        stack[p] = nnx.clone(stack[p])
    if sharing_of(plain) is not None:
        del plain.layer_sharing
    return plain


# ----------------------------------------------------------------------------- saving
def save(model, out_dir: str | os.PathLike) -> str:
    """Write ``model`` as a normal HF checkpoint (every position's layer written, so any HF tool
    reads it) plus ``sharing.json`` (mode, M, assignment); returns ``out_dir``."""
    record = sharing_of(model)
    if record is None:
        raise ValueError("the model shares no layers (no model.layer_sharing): make it with "
                         "sharing.share_layers, or save it with models.save_hf_checkpoint")
    stack = F.layer_stack(model)
    for positions in _groups(record.assignment):
        loose = [p for p in positions if stack[p] is not stack[positions[0]]]
        if loose:
            raise ValueError(f"model.layer_sharing maps positions {positions} to one layer, but position(s) "
                             f"{loose} hold another module (replaced after sharing?); share again with "
                             "sharing.share_layers")
    models.save_hf_checkpoint(untie(model), out_dir)
    with open(os.path.join(os.fspath(out_dir), SHARING_NAME), "w", encoding="utf-8") as f:
        json.dump({"mode": record.mode, "num_unique": record.num_unique,
                   "assignment": list(record.assignment)}, f, indent=2)
        f.write("\n")
    return os.fspath(out_dir)


def _read_record(path: str, n: int) -> LayerSharing:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {SHARING_NAME} in {os.path.dirname(path)}: it is not a checkpoint written by "
                                "sharing.save; load it with models.from_pretrained")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    assign = tuple(int(u) for u in d["assignment"])
    m = int(d["num_unique"])
    if len(assign) != n or sorted(set(assign)) != list(range(m)):
        raise ValueError(f"{path}: assignment {list(assign)} does not map the checkpoint's {n} layers onto "
                         f"{m} unique layers (each of 0 .. {m - 1} used)")
    return LayerSharing(str(d["mode"]), m, assign)


def load(out_dir: str | os.PathLike, num_labels: int | None = None, **kwargs):
    """The shared model of a directory written by `save`: ``models.from_pretrained(out_dir,
    num_labels, **kwargs)``, then every position re-tied to the first position of its unique
    layer.  Raises ValueError naming the layers when tied positions hold different weights (the
    checkpoint was changed after `save`)."""
    model = models.from_pretrained(out_dir, num_labels=num_labels, **kwargs)
    stack = F.layer_stack(model)
    record = _read_record(os.path.join(os.fspath(out_dir), SHARING_NAME), len(stack))
    for positions in _groups(record.assignment):
        first = models.named_params(stack[positions[0]])
        for p in positions[1:]:
            for name, var in models.named_params(stack[p]).items():
                a, b = np.asarray(first[name].get_value()), np.asarray(var.get_value())
                if not np.array_equal(a, b):
                    raise ValueError(
                        f"{out_dir}: layers {positions[0]} and {p} share one layer ({record.mode} assignment "
                        f"{list(record.assignment)}) but their {name} differ (max |diff| "
                        f"{float(np.max(np.abs(a.astype(np.float64) - b))):.3g}); the weights were changed after "
                        f"sharing.save: load with models.from_pretrained and share again")
        for p in positions[1:]:
            stack[p] = stack[positions[0]]
    model.layer_sharing = record
    return model


__all__ = ["INITS", "LayerSharing", "MODES", "SHARING_NAME", "SharingReport", "assignment", "load", "param_count",
           "save", "share_layers", "sharing_of", "stored_nbytes", "unique_param_count", "untie"]
