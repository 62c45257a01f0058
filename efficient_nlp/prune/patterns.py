"""Sparsity patterns (docs/pruning.md, "Patterns"): which weights are removed together.

A pattern maps a tensor to *units* (what is kept or removed as a whole) and back:

* ``group_key(name, shape)``: tensors with the same key share their units (a head's Q/K/V
  columns and O rows; an FFN neuron's intermediate column and output row; a whole layer);
* ``reduce(name, x)``: per-element scores -> per-unit scores (sum over the unit);
* ``expand(name, unit_mask, shape)``: per-unit keep mask -> per-element mask.

The pure pattern in the sense of docs/contracts.md, ``scores -> mask``, is `topk_mask` (keep the best
``n - k`` units) composed with these; `nm_mask` is the local N:M pattern (no distribution:
its sparsity is ``1 - N/M`` by construction).

Patterns: `unstructured`, `n_m` (N:M along an axis), `block`, `neurons` (rows/columns of a
kernel: one unit per index along ``axis``), `ffn_neurons` (an FFN neuron's ``ffn_in`` /
``ffn_gate`` column and its ``ffn_out`` row), `heads` (a head's ``q`` / ``k`` / ``v`` columns and
``o`` rows), `layers` (every tensor of a layer).  Kernels of `efficient_nlp.models` are
``[in, out]``.

`heads`, `ffn_neurons` and `layers` read the model family description
(`efficient_nlp.models.family`): a parameter's role is the layer site its module path ends with
(`param_site`), so the same pattern works on every family.  ``family=None`` accepts the sites of
every registered family; a family name (or a model) restricts them to that family.
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_nlp.models import family as F
from efficient_nlp.prune._registry import resolve


class PatternError(ValueError):
    """A pattern cannot be applied to a selected tensor (wrong shape or name)."""


# ----------------------------------------------------------------------------- family sites by name
def family_name(family) -> str | None:
    """``None``, a family name, a `Family` or a model -> the family's name (None: every family)."""
    if family is None:
        return None
    if isinstance(family, str):
        return F.get_family(family).name
    if isinstance(family, F.Family):
        return family.name
    return F.family_of(family).name


def _families(family):
    return [F.get_family(family)] if family is not None else list(F.families().values())


class ParamSite(NamedTuple):
    """A parameter ``<prefix>.<site module>.<leaf>`` of a layer site (see `param_site`)."""

    prefix: str   # the module path before the site (a layer's path, e.g. ``...layers.3``)
    role: str     # its role (`efficient_nlp.models.family.LAYER_ROLES`)
    leaf: str     # ``kernel`` / ``bias``
    family: F.Family


def param_site(name: str, family: str | None = None) -> ParamSite | None:
    """The layer site a parameter path belongs to, by its module path ending with a site's path
    inside a layer (`Family.layer_sites`), else None.  Works on bare parameter pytrees (no model
    needed); raises `PatternError` when two families read the name as different roles."""
    module, _, leaf = name.rpartition(".")
    found = {}
    for fam in _families(family):
        for role, sub in fam.layer_sites.items():
            if module == sub or module.endswith("." + sub):
                found.setdefault((module[: -len(sub)].rstrip("."), role), fam)
    if len(found) > 1:
        raise PatternError(f"{name} matches several layer sites ({sorted(r for _, r in found)}) of the "
                           "registered model families; give the pattern family=...")
    if not found:
        return None
    (prefix, role), fam = next(iter(found.items()))
    return ParamSite(prefix, role, leaf, fam)


def _sites_text(family, roles) -> str:
    """The module paths of ``roles`` in ``family`` (or every family), for error messages."""
    subs = sorted({fam.layer_sites[r] for fam in _families(family) for r in roles if r in fam.layer_sites})
    return ", ".join(subs) or "none"


def _unit_group(site: ParamSite, roles, kind: str) -> str:
    """Group key of a unit pattern: the site's prefix plus the common parent module of the
    family's ``roles`` (``...layers.3.attention``), or ``kind`` when they share none."""
    subs = [site.family.layer_sites[r].split(".") for r in roles if r in site.family.layer_sites]
    common = []
    for parts in zip(*subs):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    common = common[: min(len(s) for s in subs) - 1]  # a parent, never a site itself
    key = ".".join(common) or kind
    return f"{site.prefix}.{key}" if site.prefix else key


def layer_regex(family: str | None = None) -> re.Pattern:
    """``^(<path to a layer>)\\.``: the prefix of a parameter inside a layer of the stack
    (`Family.layers`) of ``family`` (None: any family)."""
    stacks = sorted({re.escape(fam.layers.rpartition(".")[2]) for fam in _families(family)})
    return re.compile(rf"^(.*?(?:{'|'.join(stacks)})\.\d+)\.")


def site_regex(model, roles=F.LAYER_ROLES, leaves="kernel") -> str:
    """A rule regex selecting the ``leaves`` parameters (a regex: ``kernel``, ``(kernel|bias)``,
    or None for the module paths themselves) of ``model``'s layer sites whose role is in
    ``roles`` (roles the family lacks are skipped)."""
    fam = F.family_of(model)
    subs = [re.escape(fam.layer_sites[r]) for r in F.LAYER_ROLES if r in roles and r in fam.layer_sites]
    if not subs:
        raise F.FamilyError(f"family {fam.name!r} has none of the roles {list(roles)}")
    tail = rf"\.{leaves}" if leaves else ""
    return rf"^{re.escape(fam.path(fam.layers))}\.\d+\.({'|'.join(subs)}){tail}$"


def _axis_units(x, axis, unit):
    """Sum of ``x`` over everything but ``axis``, then over consecutive groups of ``unit``."""
    axis = axis % x.ndim
    n = x.shape[axis]
    y = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
    return y.reshape(n // unit, unit).sum(-1) if unit > 1 else y


def _axis_expand(unit_mask, axis, unit, shape):
    axis = axis % len(shape)
    m = jnp.repeat(unit_mask, unit) if unit > 1 else unit_mask
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return jnp.broadcast_to(m.reshape(view), shape)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Base pattern: one unit per element (unstructured)."""

    name = "unstructured"
    local = False  # True: the mask is computed per tensor without a target sparsity (N:M)

    def group_key(self, name: str, shape) -> str:
        return name

    def check(self, name: str, shape) -> None:
        """Raises `PatternError` if the pattern does not apply to the tensor."""

    def reduce(self, name: str, x):
        return x

    def expand(self, name: str, unit_mask, shape):
        return unit_mask.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Unstructured(Pattern):
    """Every element is its own unit."""


@dataclasses.dataclass(frozen=True)
class Block(Pattern):
    """Contiguous blocks of ``block_shape`` (one entry per tensor axis) are units."""

    block_shape: tuple = (4, 4)
    name = "block"

    def check(self, name, shape):
        if len(shape) != len(self.block_shape) or any(s % b for s, b in zip(shape, self.block_shape)):
            raise PatternError(f"block pattern {tuple(self.block_shape)} does not tile {name} of shape {tuple(shape)}")

    def reduce(self, name, x):
        split = []
        for s, b in zip(x.shape, self.block_shape):
            split += [s // b, b]
        return x.reshape(split).sum(axis=tuple(range(1, 2 * x.ndim, 2)))

    def expand(self, name, unit_mask, shape):
        m = unit_mask
        for axis, b in enumerate(self.block_shape):
            m = jnp.repeat(m, b, axis=axis)
        return m


@dataclasses.dataclass(frozen=True)
class Neurons(Pattern):
    """One unit per index along ``axis`` (``-1``: output neurons = kernel columns; ``0``: rows)."""

    axis: int = -1
    name = "neurons"

    def check(self, name, shape):
        if len(shape) == 0 or not -len(shape) <= self.axis < len(shape):
            raise PatternError(f"neurons(axis={self.axis}) does not apply to {name} of shape {tuple(shape)}")

    def reduce(self, name, x):
        return _axis_units(x, self.axis, 1)

    def expand(self, name, unit_mask, shape):
        return _axis_expand(unit_mask, self.axis, 1, shape)


def _unit_site(name, family, roles, what) -> ParamSite:
    """The site of a parameter a unit pattern ties: kernels and biases of the ``roles`` whose
    units lie along the output columns, kernels of the others."""
    site = param_site(name, family)
    if site is None or site.role not in roles or site.leaf not in ("kernel", "bias") or (
            site.leaf == "bias" and site.role not in F.OUTPUT_UNIT_ROLES):
        out_roles = [r for r in roles if r in F.OUTPUT_UNIT_ROLES]
        in_roles = [r for r in roles if r not in F.OUTPUT_UNIT_ROLES]
        raise PatternError(
            f"{what} pattern applies to the kernels and biases of the {'/'.join(out_roles)} sites "
            f"({_sites_text(family, out_roles)}) and the kernels of the {'/'.join(in_roles)} sites "
            f"({_sites_text(family, in_roles)}) only, not {name} (exclude it from the rule)")
    return site


def _unit_axis(site: ParamSite) -> int:
    """Axis of a site's parameter along which its units lie (bias: 0; kernel ``[in, out]``)."""
    if site.leaf == "bias":
        return 0
    return -1 if site.role in F.OUTPUT_UNIT_ROLES else 0


@dataclasses.dataclass(frozen=True)
class Heads(Pattern):
    """Attention heads: head ``h`` = columns ``h*D:(h+1)*D`` of the ``q`` / ``k`` / ``v`` kernels
    (and biases) and the same rows of the ``o`` kernel, all pruned together (one group per
    layer).  With grouped-query attention (``group`` query heads per key/value head) the unit is
    a key/value head with its ``group`` query heads: ``group * D`` columns of q and rows of o,
    ``D`` columns of k and v.  ``family``: a family name (None: the sites of any registered family)."""

    head_dim: int = 64
    family: str | None = None
    group: int = 1
    name = "heads"

    def _unit(self, name):
        site = _unit_site(name, self.family, F.HEAD_ROLES, "heads")
        return _unit_axis(site), self.head_dim * (self.group if site.role in ("q", "o") else 1)

    def group_key(self, name, shape):
        return _unit_group(_unit_site(name, self.family, F.HEAD_ROLES, "heads"), F.HEAD_ROLES, "heads")

    def check(self, name, shape):
        axis, unit = self._unit(name)
        if shape[axis] % unit:
            raise PatternError(f"{name} of shape {tuple(shape)}: axis {axis} is not a multiple of "
                               f"{unit} (head_dim={self.head_dim} x {self.group} query heads per key/value head)")

    def reduce(self, name, x):
        axis, unit = self._unit(name)
        return _axis_units(x, axis, unit)

    def expand(self, name, unit_mask, shape):
        axis, unit = self._unit(name)
        return _axis_expand(unit_mask, axis, unit, shape)


@dataclasses.dataclass(frozen=True)
class FFNNeurons(Pattern):
    """FFN neurons: neuron ``j`` = column ``j`` of the ``ffn_in`` (and ``ffn_gate``) kernel and
    bias and row ``j`` of the ``ffn_out`` kernel, pruned together (one group per layer)."""

    family: str | None = None
    name = "ffn_neurons"

    def _axis(self, name):
        return _unit_axis(_unit_site(name, self.family, F.NEURON_ROLES, "ffn_neurons"))

    def group_key(self, name, shape):
        site = _unit_site(name, self.family, F.NEURON_ROLES, "ffn_neurons")
        return _unit_group(site, F.NEURON_ROLES, "ffn")

    def check(self, name, shape):
        self._axis(name)

    def reduce(self, name, x):
        return _axis_units(x, self._axis(name), 1)

    def expand(self, name, unit_mask, shape):
        return _axis_expand(unit_mask, self._axis(name), 1, shape)


@dataclasses.dataclass(frozen=True)
class Layers(Pattern):
    """Whole layers: every selected tensor of one layer of the stack (``...layers.<i>.``, the
    family's `Family.layers`) is one unit.

    A zeroed post-LayerNorm layer is NOT the identity, so a layer mask is a simulation;
    `efficient_nlp.prune.shrink` removes such layers for real (outputs then differ)."""

    family: str | None = None
    name = "layers"

    def group_key(self, name, shape):
        m = layer_regex(self.family).match(name)
        if m is None:
            raise PatternError(f"layers pattern: {name} is not inside a layer of the stack "
                               f"({layer_regex(self.family).pattern})")
        return m.group(1)

    def check(self, name, shape):
        self.group_key(name, shape)

    def reduce(self, name, x):
        return jnp.sum(x).reshape(1)

    def expand(self, name, unit_mask, shape):
        return jnp.broadcast_to(unit_mask.reshape((1,) * len(shape)), shape)


@dataclasses.dataclass(frozen=True)
class NM(Pattern):
    """N:M sparsity: in every M consecutive elements along ``axis`` keep the N best
    (Mishra et al. 2021; 2:4 is what sparse tensor cores run).  Sparsity is ``1 - N/M``."""

    n: int = 2
    m: int = 4
    axis: int = -1
    name = "n_m"
    local = True

    def check(self, name, shape):
        if not 0 < self.n <= self.m:
            raise PatternError(f"N:M needs 0 < N <= M, got {self.n}:{self.m}")
        if len(shape) == 0 or shape[self.axis] % self.m:
            raise PatternError(f"{name} of shape {tuple(shape)}: axis {self.axis} is not a multiple of M={self.m}")

    def mask(self, scores):
        return nm_mask(scores, self.n, self.m, self.axis)


# ----------------------------------------------------------------------------- pure masks
def _sortable_bits(scores):
    """uint32 keys ordered like the float32 ``scores`` (-0.0 and 0.0 equal, NaN above +inf)."""
    s = jnp.asarray(scores, jnp.float32)
    s = jnp.where(jnp.isnan(s), jnp.nan, jnp.where(s == 0, 0.0, s))
    b = jax.lax.bitcast_convert_type(s, jnp.uint32)
    return jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))


def _kth_key(key, k):
    """The ``k``-th smallest (1-based) of the uint32 ``key``s, by bisection over its 32 bits."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(key <= mid, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))[0]


def kth_smallest(scores, k):
    """The ``k``-th smallest entry of the 1-D float ``scores`` (1-based; 0.0 for ``k <= 0``,
    the largest for ``k >= n``); ``k`` may be traced.  Selection as in `topk_mask`, no sort."""
    key = _sortable_bits(scores)
    k = jnp.asarray(k, jnp.int32)
    kth = _kth_key(key, jnp.clip(k, 1, key.shape[0]))
    bits = jnp.where((kth >> 31) == 1, kth ^ jnp.uint32(0x80000000), ~kth)
    return jnp.where(k > 0, jax.lax.bitcast_convert_type(bits, jnp.float32), 0.0)


def topk_mask(scores, k):
    """Keep mask of a 1-D score vector with the ``k`` lowest scores removed (ties: lower index
    removed first).  ``k`` may be traced: exactly ``k`` entries are False (clipped to [0, n]).

    Selection, not sorting: the k-th smallest score is found by bisection over the 32 bits of
    its order-preserving integer key (32 counting passes), then the entries below it and the
    first of those equal to it are removed.  On 10.6M scores (a MiniLM's encoder kernels) this
    takes about a tenth of the time of a stable argsort on CPU, with the same result."""
    key = _sortable_bits(scores)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, key.shape[0])
    kth = _kth_key(key, k)
    below, tied = key < kth, key == kth
    removed = below | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= k - jnp.sum(below, dtype=jnp.int32)))
    return ~(removed & (k > 0))


def nm_mask(scores, n, m, axis=-1):
    """N:M keep mask: in each group of ``m`` consecutive entries along ``axis`` keep the ``n``
    highest scores (ties: lower index kept)."""
    x = jnp.moveaxis(scores, axis, -1)
    shape = x.shape
    g = x.reshape(shape[:-1] + (shape[-1] // m, m))
    order = jnp.argsort(-g, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = (ranks < n).reshape(shape)
    return jnp.moveaxis(keep, -1, axis)


def unstructured() -> Pattern:
    return Unstructured()


def block(*block_shape, **kwargs) -> Pattern:
    """Blocks of ``block_shape``, e.g. ``block(4, 4)`` or ``block(block_shape=(4, 4))``."""
    if "block_shape" in kwargs:
        block_shape = (tuple(kwargs.pop("block_shape")),)
    if kwargs:
        raise TypeError(f"block() got unexpected arguments {sorted(kwargs)}")
    if len(block_shape) == 1 and isinstance(block_shape[0], (tuple, list)):
        block_shape = tuple(block_shape[0])
    return Block(tuple(int(b) for b in block_shape))


def neurons(axis: int = -1) -> Pattern:
    return Neurons(axis)


def rows() -> Pattern:
    """Kernel rows (input units of an ``[in, out]`` kernel)."""
    return Neurons(0)


def heads(head_dim: int | None = None, family=None) -> Pattern:
    """Attention heads of width ``head_dim``; ``family``: a family name, `Family` or model (a
    model also gives the default ``head_dim`` and, with grouped-query attention, the query heads
    per key/value head: `efficient_nlp.models.family.head_layout`)."""
    group = 1
    if family is not None and not isinstance(family, (str, F.Family)):
        layout = F.head_layout(family)
        head_dim = layout.head_dim if head_dim is None else head_dim
        group = layout.num_heads // max(layout.num_kv_heads, 1)
    if head_dim is None:
        raise ValueError("heads() needs head_dim (or a model as family to read it from)")
    return Heads(int(head_dim), family_name(family), int(group))


def ffn_neurons(family=None) -> Pattern:
    return FFNNeurons(family_name(family))


def layers(family=None) -> Pattern:
    return Layers(family_name(family))


def n_m(n: int = 2, m: int = 4, axis: int = -1) -> Pattern:
    return NM(int(n), int(m), int(axis))


PATTERNS = {"unstructured": unstructured, "block": block, "neurons": neurons, "rows": rows,
            "heads": heads, "ffn_neurons": ffn_neurons, "layers": layers, "n_m": n_m}


def get_pattern(pattern, **kwargs) -> Pattern:
    """A `Pattern` from a name in `PATTERNS` with keyword arguments (or a `Pattern`)."""
    return resolve(PATTERNS, pattern, "sparsity pattern", Pattern, **kwargs)

