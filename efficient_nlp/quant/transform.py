"""Turn a model into a fake-quantized model from a `QuantSpec` (docs/quantization.md).

    qmodel, report = quant.quantize_model(model, quant.make_spec(2, 2, 8))
    print(report)                      # every site, its quantizer and why
    quant.calibrate(qmodel, batch)     # only needed for learned activation quantizers (lsq, pact)

Works on the models of `efficient_nlp.models` (Linear, Embed and the attention matmul hook,
with the site roles their family describes, `efficient_nlp.models.family`) and on any NNX model
built from ``nnx.Linear`` / ``nnx.Embed`` (roles unknown there: every input is signed).  Those
modules are replaced in a copy of the model by `QuantLinear` / `QuantEmbed` holding the same
parameters, so parameter paths do not change (a checkpoint of the float model loads into the
quantized one and back).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant import modules as M
from efficient_nlp.quant.spec import QuantSpec, Quantizer, resolve

#: Attribute names of activation quantizers (weights are initialised from the weights).
ACTIVATION_QUANTIZERS = ("input_quant", "q", "k", "v", "probs")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def family_or_none(model) -> F.Family | None:
    """The model's `Family`, or None for a model no family describes (a plain NNX model)."""
    try:
        return F.family_of(model)
    except F.FamilyError:
        return None


def _attention_paths(model, fam) -> set[str]:
    """Paths of the attention modules (``matmul_quant`` hook) of a family's layers."""
    if fam is None:
        return set()
    paths = {F.attention_path(model, i) for i in range(F.num_layers(model))}
    for path in paths:
        if not hasattr(F.get_module(model, path), "matmul_quant"):
            raise F.FamilyError(f"family {fam.name!r}: the attention module {path} has no matmul_quant hook")
    return paths


#: Sub-module names of a wrapped Linear that read the site's own input: the first factor of a
#: factorised Linear (`efficient_nlp.lowrank.LowRankLinear`), the base under LoRA / an adapter.
_SAME_INPUT = (".down", ".base")


def _unsigned_input(model, fam, name: str) -> bool:
    """Whether the Linear at ``name`` has a mostly non-negative input (its role, or the role of
    the site it is the input-reading part of, is one of the family's ``unsigned_input_roles``:
    after GELU / ReLU)."""
    if fam is None:
        return False
    while name.endswith(_SAME_INPUT) and F.site_of(model, name) is None:
        name = name.rpartition(".")[0]
    site = F.site_of(model, name)
    return site is not None and site.role in fam.unsigned_input_roles


def find_sites(model) -> tuple[list, dict[str, str]]:
    """``(modules, sites)``: the quantizable modules ``[(path, module, kind)]`` and every site
    name with its role (see `efficient_nlp.quant.spec`).  A Linear's input is
    ``activation_unsigned`` when its family role is one of ``Family.unsigned_input_roles``; the
    family's attention modules give the ``q / k / v / probs`` sites."""
    fam = family_or_none(model)
    attention = _attention_paths(model, fam)
    found, sites = [], {}
    for path, mod in nnx.iter_modules(model):
        name = _dotted(path)
        if isinstance(mod, (nnx.Linear, M.QuantLinear)):
            found.append((path, mod, "linear"))
            sites[name] = "weight"
            sites[name + ".input"] = "activation_unsigned" if _unsigned_input(model, fam, name) else "activation"
        elif isinstance(mod, (nnx.Embed, M.QuantEmbed)):
            found.append((path, mod, "embed"))
            sites[name] = "embedding"
        elif name in attention:
            found.append((path, mod, "attention"))
            for part in ("q", "k", "v"):
                sites[f"{name}.{part}"] = "activation"
            sites[name + ".probs"] = "activation_unsigned"
    if any(isinstance(m, (M.QuantLinear, M.QuantEmbed)) for _, m, _ in found):
        raise ValueError("the model is already quantized; quantize the float model instead")
    return found, sites


@dataclasses.dataclass
class QuantReport:
    """What `quantize_model` did: ``rows`` of (site, quantizer name or "float", reason)."""

    spec: QuantSpec
    rows: list

    @property
    def quantized(self) -> list[str]:
        return [site for site, q, _ in self.rows if q != "float"]

    def __str__(self):
        width = max([len(r[0]) for r in self.rows] + [4])
        lines = [f"quantization {self.spec.bits}: {len(self.quantized)} of {len(self.rows)} sites quantized",
                 f"{'site':<{width}}  {'quantizer':<10}  reason"]
        lines += [f"{site:<{width}}  {q:<10}  {why}" for site, q, why in self.rows]
        return "\n".join(lines)


def _replace(model, path, new):
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def quantize_model(model, spec: QuantSpec, *, keep_float_sites: bool = False):
    """A fake-quantized copy of ``model`` and a `QuantReport`; ``model`` is not changed.

    Every ``nnx.Linear`` / ``nnx.Embed`` (and the family's attention hook) whose site the spec
    quantizes is replaced; ``keep_float_sites`` also wraps the float ones (no quantizer, same
    outputs) so that `efficient_nlp.quant.cost` sees every matmul.  Rules that match no site
    raise `efficient_nlp.tree.RuleError` listing the site names.
    """
    model = train.copy_model(model)
    found, sites = find_sites(model)
    chosen = resolve(spec, sites)
    rows = [(site, "float" if q is None else q.name, why) for site, (q, why) in chosen.items()]
    for path, mod, kind in found:
        name = _dotted(path)
        if kind == "linear":
            w, a = chosen[name][0], chosen[name + ".input"][0]
            if w is not None or a is not None or keep_float_sites:
                _replace(model, path, M.QuantLinear(mod, name, w, a))
        elif kind == "embed":
            q = chosen[name][0]
            if q is not None:
                _replace(model, path, M.QuantEmbed(mod, name, q))
        else:
            qs = [chosen[f"{name}.{p}"][0] for p in ("q", "k", "v", "probs")]
            if any(q is not None for q in qs) or keep_float_sites:
                # nnx.data: the hook attribute starts as None (static) and now holds a module.
                mod.matmul_quant = nnx.data(M.AttentionQuant(name, *qs))
    return model, QuantReport(spec, rows)


def quantizer_modules(model) -> list[tuple[str, M.QuantizerModule]]:
    """``[(path, QuantizerModule)]`` of a quantized model."""
    return [(_dotted(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, M.QuantizerModule)]


def calibrate(model, batch: dict[str, Any] | Callable) -> int:
    """Initialise learned activation quantizers (LSQ step / offset, PACT clip) from one batch.

    ``batch``: a dict with ``input_ids`` (and optionally ``attention_mask``,
    ``token_type_ids``) for the models of `efficient_nlp.models`, or a callable ``fn(model)``
    running any forward pass.
    Runs eagerly (not jitted) once; returns how many quantizers were initialised.
    """
    todo = [m for path, m in quantizer_modules(model) if m.quantizer.method in ("lsq", "pact")
            and path.rsplit(".", 1)[-1] in ACTIVATION_QUANTIZERS]
    for m in todo:
        m.calibrating = True
    try:
        if callable(batch):
            batch(model)
        else:
            F.forward(model, batch)
    finally:
        for m in todo:
            m.calibrating = False
    missing = [m.quantizer.name for m in todo if not m.calibrated]
    if missing:
        raise RuntimeError(f"{len(missing)} activation quantizer(s) saw no data during calibration")
    return len(todo)


__all__ = ["Quantizer", "QuantSpec", "QuantReport", "find_sites", "quantize_model", "calibrate",
           "quantizer_modules", "family_or_none"]
