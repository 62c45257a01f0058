"""Adaptive splitting (BinaryBERT, Bai et al. 2021; docs/binarybert_adaptive.md): which TWN matrices of a
half-width ternary model are ternary-then-split (two binary halves, the ternary function) and
which become plain binary, under a size or FLOPs / BOPs budget.

    sites = quant.splittable_sites(qmodel)
    groups = group_sites(sites)                          # Q/K, V, O, FFN-in, FFN-out per layer
    base_score, sens = sensitivity(qmodel, groups, score_fn)     # score_fn(model) -> float
    base, extra = split_costs(qmodel, sites, "size_mb")  # C0 and each site's extra cost
    choice = choose_split(groups, {g: s.value for g, s in sens.items()}, extra,
                          budget=base + 0.5 * sum(extra.values()), base=base)
    binary, _ = quant.split_model(qmodel, choice.sites)

Terms (one meaning throughout):

* A *site* is the dotted module path of a TWN-quantized Linear / Embed (`splittable_sites`).
  A *split* site is ternary-then-split (`split_model`): two binary halves computing ``TWN(w)``;
  an *unsplit* site computes ``BWN(w)`` of the same latent weight.
* A *group* is a set of sites decided together: a Transformer part (``qk`` = query and key,
  ``v``, ``o`` = attention output, ``ffn_in`` (with ``ffn_gate`` in a gated FFN), ``ffn_out``)
  of one layer (``by="part_layer"``), a whole layer (``by="layer"``) or one part across all
  layers (``by="part"``).  A site's part and layer come from its role in the model family's
  layout (`efficient_nlp.models.family`, `site_part`).  Sites outside the Transformer layers
  (word embedding, head modules) are one group each in every mode.
* *Sensitivity* of a group: the gain ``score(group split, rest binary) - score(all binary)`` of
  a higher-is-better ``score_fn`` on held-out data (e.g. minus a loss, or accuracy), and its
  *value* ``u = gain / parameter count`` (BinaryBERT's definition: the gain divided by the
  parameter count).  The recipe (`efficient_nlp.recipes.adaptive_split`) scores with minus the soft
  cross-entropy to the teacher's logits, the loss the split model is then fine-tuned with.
* *Cost*: ``C0`` is the cost of the all-binary (nothing split) model; splitting a site adds
  ``size_mb``: one more bit per weight and one more float32 scale per scale group; ``flops``:
  one more matmul of the same shape (FLOPs per example); ``bops``: that matmul counted at 1-bit
  weights and its input's bits, ``FLOPs * 1 * a_bits / 64`` (docs/quantization.md; the conventions
  of `efficient_nlp.quant.cost`).  The problem ``max u^T s  s.t.  c^T s <= C - C0,
  s in {0,1}^Z`` over groups is solved exactly by `knapsack` after the conservative `discretise`.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import numpy as np
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.cost import _scale_groups
from efficient_nlp.quant.export import quantized_weights
from efficient_nlp.quant.transform import _attention_paths, _dotted, _replace, family_or_none

#: Transformer parts in the order of a layer's computation.
PARTS = ("qk", "v", "o", "ffn_in", "ffn_out")
#: The part of each layer role (`efficient_nlp.models.family.LAYER_ROLES`); a gated FFN's
#: ``ffn_gate`` goes with ``ffn_in`` (both hold the neurons along their outputs).
PART_OF_ROLE = {"q": "qk", "k": "qk", "v": "v", "o": "o", "ffn_in": "ffn_in", "ffn_gate": "ffn_in",
                "ffn_out": "ffn_out"}
GROUPINGS = ("part_layer", "layer", "part")
COST_KINDS = ("size_mb", "flops", "bops")
METHODS = ("knapsack", "random", "uniform")


# ----------------------------------------------------------------------------- groups
def layer_site(site: str) -> F.Site | None:
    """The `efficient_nlp.models.family.Site` (layer, role) of a module path in the layout of
    any registered family (`efficient_nlp.models.family.find_site`), else None (embeddings,
    head modules, a model no family describes)."""
    return F.find_site(site)


def site_part(site: str) -> tuple[str | None, int | None]:
    """``(part, layer)`` of a site name from its family role (``("qk", 3)`` for layer 3's ``k``
    site); ``(None, None)`` outside the Transformer layers' matmuls (embeddings, head modules)."""
    s = layer_site(site)
    return (None, None) if s is None else (PART_OF_ROLE[s.role], s.layer)


@dataclasses.dataclass(frozen=True)
class Group:
    """Sites decided together: ``name`` (``layer3.qk``, ``layer3``, ``qk`` or the site's own
    name outside the layers), ``part`` / ``layer`` (None where the group spans several)."""

    name: str
    part: str | None
    layer: int | None
    sites: tuple[str, ...]


def group_sites(sites, by: str = "part_layer") -> list[Group]:
    """Groups covering every site exactly once (module docstring); ordered by layer, then part."""
    if by not in GROUPINGS:
        raise ValueError(f"group_sites: by={by!r}; valid: {GROUPINGS}")
    sites = list(sites)
    if len(set(sites)) != len(sites):
        raise ValueError("group_sites: repeated site names")
    keyed: dict = {}
    other = []
    for site in sites:
        part, layer = site_part(site)
        if part is None:
            other.append(Group(site, None, None, (site,)))
            continue
        key = {"part_layer": (layer, part), "layer": (layer, None), "part": (None, part)}[by]
        keyed.setdefault(key, []).append(site)

    def order(key):
        layer, part = key
        return (-1 if layer is None else layer, -1 if part is None else PARTS.index(part))

    groups = []
    for layer, part in sorted(keyed, key=order):
        name = ".".join(x for x in ((f"layer{layer}" if layer is not None else None), part) if x)
        groups.append(Group(name, part, layer, tuple(keyed[(layer, part)])))
    return groups + other


# ----------------------------------------------------------------------------- sensitivity
def _twn_weights(model, sites):
    """``{site: (module, weight Variable)}`` of the TWN weights named in ``sites``."""
    found = {path: (mod, getattr(mod, attr)) for path, mod, attr in quantized_weights(model)}
    missing = [s for s in sites if s not in found]
    if missing:
        raise ValueError(f"no quantized weight at site(s) {missing}; valid: {sorted(found)}")
    not_twn = [s for s in sites if found[s][0].weight_quant.quantizer.method != "twn"]
    if not_twn:
        raise ValueError(f"site(s) {not_twn} are not TWN-quantized; adaptive splitting compares ternary "
                         "with binary weights (quantize with quant.make_spec(2, 2, a_bits))")
    return {s: found[s] for s in sites}


def assignment_scorer(qmodel, sites, score_fn):
    """``score(split_sites) -> float``: ``score_fn`` of the model in which the ``sites`` in
    ``split_sites`` compute ``TWN(w)`` and the other ``sites`` ``BWN(w)`` of their latent weight,
    i.e. exactly the function of ``split_model(qmodel, split_sites)`` before fine-tuning.

    Works on one private copy whose weight quantizers at ``sites`` are frozen (the weights are
    written already quantized), so every assignment has the same graph: a jitted ``score_fn``
    (e.g. one built on `efficient_nlp.train.predict`) compiles once.
    """
    model = train.copy_model(qmodel)
    weights = _twn_weights(model, list(sites))
    values = {}
    for site, (mod, var) in weights.items():
        w, axis = var[...], mod.weight_quant.axis
        values[site] = (Q.twn(w, axis)[0], Q.bwn(w, axis)[0])
        mod.weight_quant.frozen = True

    def score(split_sites):
        split_sites = set(split_sites)
        unknown = sorted(split_sites - set(weights))
        if unknown:
            raise ValueError(f"split site(s) {unknown} are not among the scored sites")
        for site, (_, var) in weights.items():
            var[...] = values[site][0 if site in split_sites else 1]
        return float(score_fn(model))

    return score


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """``gain`` (score with the group split minus score with everything binary), ``params``
    (latent weights in the group) and ``value = gain / params``."""

    gain: float
    params: int
    value: float


REFERENCES = ("binary", "split")


def sensitivity(qmodel, groups, score_fn, *, reference: str = "binary") -> tuple[float, dict[str, Sensitivity]]:
    """``(score of the reference model, {group name: Sensitivity})`` (docs/binarybert_adaptive.md).

    ``score_fn(model) -> float`` is higher-is-better on held-out data (minus a loss, or a
    metric).  ``reference="binary"`` (BinaryBERT's): the gain of splitting the group alone,
    ``score(group split, every other site binary) - score(all binary)``; ``"split"``: the loss
    of binarizing the group alone, ``score(all split) - score(all split but the group)``, i.e.
    measured around the ternary model instead of around the all-binary one (useful when the
    all-binary model is at chance and single-group gains are noise).  See `assignment_scorer`.
    A group whose ternary and binary weights coincide has gain exactly 0 either way.
    """
    if reference not in REFERENCES:
        raise ValueError(f"sensitivity: reference={reference!r}; valid: {REFERENCES}")
    sites = [s for g in groups for s in g.sites]
    score = assignment_scorer(qmodel, sites, score_fn)
    sizes = {s: int(np.size(var[...])) for s, (_, var) in _twn_weights(qmodel, sites).items()}
    base = score(() if reference == "binary" else sites)
    out = {}
    for g in groups:
        if reference == "binary":
            gain = score(g.sites) - base
        else:
            gain = base - score([s for s in sites if s not in g.sites])
        params = sum(sizes[s] for s in g.sites)
        out[g.name] = Sensitivity(gain, params, gain / params)
    return base, out


# ----------------------------------------------------------------------------- costs
def _matmul_records(qmodel, inputs):
    """One record per matmul of a forward pass traced abstractly (`modules.recording`)."""
    model = train.copy_model(qmodel)
    attention = _attention_paths(model, family_or_none(model))
    floats = []
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, M.QuantizerModule):
            mod.calibrated = True  # abstract trace only: values do not matter
        elif isinstance(mod, nnx.Linear):
            floats.append((path, mod))
        elif _dotted(path) in attention and mod.matmul_quant is None:
            mod.matmul_quant = nnx.data(M.AttentionQuant(_dotted(path), None, None, None, None))
    for path, mod in floats:     # float matmuls count too (as cost_report's keep_float_sites)
        _replace(model, path, M.QuantLinear(mod, _dotted(path), None, None))
    with M.recording() as records:
        jax.eval_shape(lambda: F.forward(model, inputs))
    return records, int(np.shape(inputs["input_ids"])[0])


def split_costs(qmodel, sites, kind: str = "size_mb", inputs=None) -> tuple[float, dict[str, float]]:
    """``(C0, {site: extra cost of splitting it})`` for a TWN model (module docstring).

    ``C0`` is the cost of ``qmodel`` with every site in ``sites`` binary (unsplit):
    ``size_mb`` the stored size in MB (quantized weights at their bits plus a float32 scale per
    group, everything else float32, as `efficient_nlp.quant.cost`), ``flops`` / ``bops`` per
    example of the batch ``inputs`` (``input_ids`` [B, T], optional ``attention_mask``,
    ``token_type_ids``; needed for those two kinds).
    """
    if kind not in COST_KINDS:
        raise ValueError(f"split_costs: kind={kind!r}; valid: {COST_KINDS}")
    sites = list(sites)
    weights = _twn_weights(qmodel, sites)
    if kind == "size_mb":
        bits = 32.0 * sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(qmodel, nnx.Param)))
        for path, mod, attr in quantized_weights(qmodel):
            shape = getattr(mod, attr)[...].shape
            w_bits = 1 if path in weights else mod.weight_quant.quantizer.bits
            bits += math.prod(shape) * (w_bits - 32) + 32 * _scale_groups(shape, mod.weight_quant.axis)
        extra = {s: (math.prod(var[...].shape) + 32 * _scale_groups(var[...].shape, mod.weight_quant.axis)) / 8 / 2**20
                 for s, (mod, var) in weights.items()}
        return bits / 8 / 2**20, extra
    if inputs is None:
        raise ValueError(f"split_costs: kind={kind!r} needs inputs (a batch with input_ids) to count matmuls")
    records, batch = _matmul_records(qmodel, inputs)
    base, extra = 0.0, {s: 0.0 for s in sites}
    for r in records:
        flops = 2.0 * r["macs"] / batch
        w_bits = 1 if r["site"] in weights else r["w_bits"]
        cost = flops
        if kind == "bops" and w_bits <= 8 and r["a_bits"] <= 8:
            cost = flops * w_bits * r["a_bits"] / 64
        base += cost
        if r["site"] in weights:
            extra[r["site"]] += cost
    return base, extra


# ----------------------------------------------------------------------------- knapsack
def discretise(costs, capacity, max_units: int = 100_000) -> tuple[list[int], int, Fraction]:
    """``(integer costs, integer capacity, unit)`` for `knapsack` from non-negative float costs
    (MB, FLOPs, ...) and a capacity.

    Integer costs whose gcd ``g`` gives at most ``max_units`` capacity units are divided by
    ``g`` exactly (nothing lost).  Otherwise ``unit = capacity / max_units`` and, in exact
    rational arithmetic, ``cost_i -> ceil(cost_i / unit)``, ``capacity -> floor(capacity /
    unit)``: costs round up and the capacity down, so any set within the integer capacity
    satisfies ``sum cost_i <= unit * sum ceil(cost_i / unit) <= unit * floor(capacity / unit)
    <= capacity`` (never over budget).  The price is optimality: a set that fits with less than
    ``len(costs) * unit`` to spare may be missed.
    """
    if max_units < 1:
        raise ValueError(f"discretise: max_units must be >= 1, got {max_units}")
    exact = [Fraction(float(c)) for c in costs]
    cap = Fraction(float(capacity))
    if any(c < 0 for c in exact) or cap < 0:
        raise ValueError(f"discretise: costs and capacity must be >= 0 (capacity {float(cap)}, "
                         f"min cost {float(min(exact, default=0))})")
    ints = [int(c) for c in exact if c.denominator == 1 and c > 0]
    if all(c.denominator == 1 for c in exact) and cap.denominator == 1:
        g = math.gcd(*ints) if ints else 1
        if cap // g <= max_units:
            return [int(c) // g for c in exact], int(cap // g), Fraction(g)
    if cap == 0:
        return [0 if c == 0 else 1 for c in exact], 0, Fraction(1)
    unit = cap / max_units
    return [math.ceil(c / unit) for c in exact], math.floor(cap / unit), unit


def knapsack(values, costs, capacity) -> list[int]:
    """Exact 0/1 knapsack by dynamic programming: the indices (ascending) of a subset
    maximising ``sum values[i]`` subject to ``sum costs[i] <= capacity``.

    ``costs`` and ``capacity`` are non-negative ints (use `discretise` for float costs); items
    with value <= 0 are never taken.  Time O(n * capacity), memory n * capacity bits.
    """
    values = [float(v) for v in values]
    if len(values) != len(costs):
        raise ValueError(f"knapsack: {len(values)} values but {len(costs)} costs")
    for c in list(costs) + [capacity]:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"knapsack: costs and capacity must be non-negative ints, got {c!r}; "
                             "discretise float costs first (adaptive.discretise)")
    capacity = int(capacity)
    best = np.zeros(capacity + 1)           # best[j]: max value with total cost <= j
    take = np.zeros((len(values), capacity + 1), bool)
    for i, (v, c) in enumerate(zip(values, costs)):
        c = int(c)
        if c > capacity or v <= 0:
            continue
        candidate = best[:capacity + 1 - c] + v
        better = candidate > best[c:]
        take[i, c:] = better
        best = best.copy()
        best[c:] = np.where(better, candidate, best[c:])
    chosen, j = [], capacity
    for i in range(len(values) - 1, -1, -1):
        if take[i, j]:
            chosen.append(i)
            j -= int(costs[i])
    return sorted(chosen)


# ----------------------------------------------------------------------------- choosing
@dataclasses.dataclass(frozen=True)
class Choice:
    """An assignment: ``sites`` to split, ``units`` chosen (group names; part or layer names for
    ``uniform``), ``cost`` (sum of the extra costs, <= ``budget - base``) and ``value`` (sum of
    the values of the groups whose sites are all split)."""

    method: str
    sites: tuple[str, ...]
    units: tuple[str, ...]
    cost: float
    value: float


def _uniform_units(groups, by):
    """``[(name, sites)]``: one unit per part (across layers, PARTS order) or per layer
    (ascending); groups outside the Transformer layers are units of their own, last."""
    if by not in ("part", "layer"):
        raise ValueError(f"choose_split: uniform_by={by!r}; use 'part' or 'layer'")
    units: dict = {}
    other = []
    for g in groups:
        for site in g.sites:
            part, layer = site_part(site)
            if part is None:
                other.append((site, (site,)))
            else:
                units.setdefault(part if by == "part" else layer, []).append(site)
    keys = [p for p in PARTS if p in units] if by == "part" else sorted(units)
    return [(k if by == "part" else f"layer{k}", tuple(units[k])) for k in keys] + other


def choose_split(groups, values, costs, budget, *, base: float = 0.0, method: str = "knapsack",
                 seed: int = 0, uniform_by: str = "part", max_units: int = 100_000) -> Choice:
    """The sites to split under ``budget`` (BinaryBERT: ``max u^T s  s.t.  c^T s <= C - C0``).

    ``groups``: `group_sites` output; ``values``: ``{group name: u}`` (e.g. `Sensitivity.value`);
    ``costs``: ``{site: extra cost}`` and ``base`` = ``C0`` from `split_costs`; ``budget`` = C
    in the same unit.  Methods: ``knapsack`` (exact DP on the `discretise`d costs),
    ``random`` (groups in a seeded random order, each taken if it still fits), ``uniform``
    (the same part in every layer, ``uniform_by="part"``, or whole layers, ``"layer"``; units
    in that fixed order, each taken if it still fits; values are not used).  All three stay
    within the budget.
    """
    if method not in METHODS:
        raise ValueError(f"choose_split: method={method!r}; valid: {METHODS}")
    capacity = budget - base
    if capacity < 0:
        raise ValueError(f"choose_split: budget {budget} is below C0 = {base} (the all-binary model); "
                         "give a budget >= C0")
    sites = [s for g in groups for s in g.sites]
    missing = [s for s in sites if s not in costs]
    if missing:
        raise ValueError(f"choose_split: no cost for site(s) {missing}")
    unvalued = [g.name for g in groups if g.name not in values]
    if method != "uniform" and unvalued:
        raise ValueError(f"choose_split: no value for group(s) {unvalued}")

    def group_cost(site_list):
        return math.fsum(costs[s] for s in site_list)

    if method == "knapsack":
        ints, cap, _ = discretise([group_cost(g.sites) for g in groups], capacity, max_units)
        units = [(groups[i].name, groups[i].sites) for i in knapsack([values[g.name] for g in groups], ints, cap)]
    else:
        if method == "random":
            order = np.random.default_rng(seed).permutation(len(groups))
            candidates = [(groups[i].name, groups[i].sites) for i in order]
        else:
            candidates = _uniform_units(groups, uniform_by)
        units, used = [], []
        for name, unit_sites in candidates:
            if group_cost(used + list(unit_sites)) <= capacity:
                units.append((name, unit_sites))
                used += list(unit_sites)
    chosen = [s for _, unit_sites in units for s in unit_sites]
    done = set(chosen)
    value = math.fsum(values.get(g.name, 0.0) for g in groups if set(g.sites) <= done)
    return Choice(method, tuple(sorted(chosen)), tuple(n for n, _ in units), group_cost(chosen), value)


__all__ = ["PARTS", "PART_OF_ROLE", "REFERENCES", "Group", "layer_site", "site_part", "group_sites",
           "assignment_scorer", "Sensitivity", "sensitivity", "split_costs", "discretise", "knapsack", "Choice",
           "choose_split"]
