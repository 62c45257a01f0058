"""Sharding of the training state by rules on a 2-D device mesh (``data``, ``model``).

Mesh (`make_mesh`): ``config.train.mesh = {"data": -1, "model": 1}`` -- one size per axis, -1 for
"all remaining devices"; the sizes must multiply to the number of devices. Devices are ordered by
(host, id) and ``model`` is the inner axis, so a model-parallel group stays within a host.

Rules (``config.train.sharding``): a list of ``(regex, spec)`` pairs over the dotted parameter
paths (``bert.encoder.layers.3.attention.query.kernel``), selected with `efficient_nlp.tree`
(``re.search``; the FIRST matching rule wins). ``spec`` names, per array dimension, the mesh
axis (or tuple of axes) it is split over, or None: ``(None, "model")`` splits the columns of a
kernel over ``model``. A spec may also be a callable ``spec(shape, mesh) -> PartitionSpec`` such
as `fsdp`. Leaves no rule matches are replicated. A spec whose axes do not divide the leaf's
shape raises `ShardingError` naming the path, the shape and the mesh.

Presets (`preset_rules`):

* ``"replicated"`` -- data parallelism: every leaf on every device (the default).
* ``"fsdp"`` -- fully sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020): the largest
  axis divisible by the ``data`` size of every leaf of at least `FSDP_MIN_SIZE` elements.
* ``"tensor"`` -- Megatron tensor parallelism (Shoeybi et al. 2019): the kernels of the
  column-parallel sites (q, k, v, ffn_in, ffn_gate) split by columns over ``model`` with their
  biases, the row-parallel sites (o, ffn_out) by rows. The sites are read from the layer layout
  of every registered model family (`efficient_nlp.models.family`), also under a prefix (the
  ``student.`` / ``teacher.`` of a distillation wrapper).
* ``"fsdp+tensor"`` -- both: tensor-parallel kernels also get their other axis split over
  ``data``, the remaining leaves as in ``"fsdp"``.

The training state (`param_specs` of a `efficient_nlp.train.step.TrainState`): parameters and
the other model variables by the rules; each optimizer-state leaf (Adam's ``mu`` / ``nu``) takes
the spec of the parameter whose path ends its own path and whose shape it has, every other
optimizer leaf (counts, scalars) is replicated; the step counter is replicated. Batches are
split over ``data`` only (`efficient_nlp.train.distributed.shard_batch`).
"""
from __future__ import annotations

import math
import re
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from efficient_nlp import tree as tree_lib
from efficient_nlp.train import distributed
from efficient_nlp.train.distributed import DATA_AXIS, MODEL_AXIS

MESH_AXES = (DATA_AXIS, MODEL_AXIS)
DEFAULT_MESH = {DATA_AXIS: -1, MODEL_AXIS: 1}
PRESETS = ("replicated", "fsdp", "tensor", "fsdp+tensor")
#: Leaves smaller than this many elements stay replicated under `fsdp` (LayerNorm scales,
#: biases, scalars): splitting them saves little memory and adds a gather each.
FSDP_MIN_SIZE = 1024
#: Megatron roles (`efficient_nlp.models.family.LAYER_ROLES`): split by output columns / by input rows.
COLUMN_ROLES = ("q", "k", "v", "ffn_in", "ffn_gate")
ROW_ROLES = ("o", "ffn_out")


class ShardingError(ValueError):
    """A mesh shape that does not fit the devices, or a spec that does not fit a leaf."""


class PresetRule(tuple):
    """A ``(regex, spec)`` rule of a preset: it may match nothing (a model without biases, a
    family without ``ffn_gate``), so presets combine with user rules without errors."""


# ----------------------------------------------------------------------------- mesh
def mesh_shape(shape=None, num_devices=None) -> dict:
    """``{"data": n, "model": m}`` with -1 resolved; raises `ShardingError` unless it fits.

    ``shape``: a mapping with keys among ``data`` / ``model`` (missing ones: ``data`` -1,
    ``model`` 1); at most one size is -1 (the devices left over by the others).
    """
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    given = dict(shape or {})
    unknown = sorted(set(given) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"mesh {given} has unknown axes {unknown}; the mesh axes are {list(MESH_AXES)}, "
                            "e.g. {'data': -1, 'model': 2}")
    sizes = {axis: int(given.get(axis, DEFAULT_MESH[axis])) for axis in MESH_AXES}
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
        raise ShardingError(f"mesh {sizes}: sizes must be positive, with at most one -1 (the remaining devices)")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(f"mesh {sizes} cannot use all {num_devices} devices: {num_devices} is not a "
                                f"multiple of {fixed}; choose sizes that divide the device count")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(f"mesh {sizes} needs {fixed} devices but there are {num_devices}; make the sizes "
                            f"multiply to {num_devices} or set one of them to -1")
    return sizes


def make_mesh(shape=None, devices=None) -> Mesh:
    """The mesh (``data``, ``model``) of `mesh_shape` over ``devices`` (default: all global
    devices), ordered by (process_index, id) so each host's batch rows land on its own devices."""
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    sizes = mesh_shape(shape, len(devices))
    grid = np.array(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    axis_type = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    if axis_type is not None:  # explicit Auto: newer jax may default to Explicit axes
        try:
            return Mesh(grid, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))
        except TypeError:  # pragma: no cover - Mesh without axis_types
            pass
    return Mesh(grid, MESH_AXES)


# ----------------------------------------------------------------------------- specs
def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[a] for a in names if a is not None)


class fsdp:  # noqa: N801  (used like a function in rule lists)
    """Spec callable: the largest axis of the leaf divisible by the ``data`` size, split over
    ``data`` (ties: the first); replicated below ``min_size`` elements or when no axis divides.
    ``base``: a spec the leaf keeps (e.g. a tensor-parallel split); only its None axes are
    candidates. (A plain class, not a dataclass: configs copied with ``dataclasses.asdict``
    keep it callable.)"""

    def __init__(self, min_size: int = FSDP_MIN_SIZE, base: tuple = ()):
        self.min_size, self.base = int(min_size), tuple(base)

    def __eq__(self, other):
        return isinstance(other, fsdp) and (self.min_size, self.base) == (other.min_size, other.base)

    def __hash__(self):
        return hash((fsdp, self.min_size, self.base))

    def __repr__(self):
        return f"fsdp(min_size={self.min_size}, base={self.base})"

    def __call__(self, shape, mesh: Mesh) -> PartitionSpec:
        spec = list(self.base) + [None] * (len(shape) - len(self.base))
        n = mesh.shape.get(DATA_AXIS, 1)
        if n > 1 and math.prod(shape) >= self.min_size and DATA_AXIS not in _used_axes(spec):
            free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n == 0]
            if free:
                spec[max(free, key=lambda d: (shape[d], -d))] = DATA_AXIS
        return _canonical(spec)


def _used_axes(spec) -> set:
    out = set()
    for entry in spec:
        out.update(entry if isinstance(entry, tuple) else (entry,))
    return out - {None}


def resolve_spec(name: str, shape, payload, mesh: Mesh) -> PartitionSpec:
    """The `PartitionSpec` of leaf ``name`` of ``shape`` from a rule's payload, checked against
    ``mesh``: known axes, each used once, at most one entry per dimension, sizes dividing.
    Trailing None entries are dropped (``("model", None)`` gives ``P("model")``)."""
    spec = payload(tuple(shape), mesh) if callable(payload) else payload
    if spec is None:
        spec = ()
    if isinstance(spec, str):
        spec = (spec,)
    entries = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
    where = f"leaf {name} of shape {tuple(shape)} on mesh {dict(mesh.shape)}"
    if len(entries) > len(shape):
        raise ShardingError(f"spec {entries} has {len(entries)} entries but {where} has {len(shape)} "
                            "dimensions; give one entry (axis name or None) per dimension")
    axes = [a for e in entries for a in (e if isinstance(e, tuple) else (e,)) if a is not None]
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ShardingError(f"spec {entries} of {where} names axes {unknown} that the mesh lacks; "
                            f"mesh axes are {list(mesh.axis_names)}")
    if len(set(axes)) != len(axes):
        raise ShardingError(f"spec {entries} of {where} uses a mesh axis twice")
    for dim, entry in enumerate(entries):
        size = _axis_size(mesh, entry)
        if shape[dim] % size:
            raise ShardingError(f"spec {entries} does not divide {where}: dimension {dim} ({shape[dim]}) is not a "
                                f"multiple of {size}; change the rule or the mesh")
    return _canonical(entries)


def _canonical(entries) -> PartitionSpec:
    """Without trailing None entries: ``P(None, None)`` is ``P()``."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


# ----------------------------------------------------------------------------- presets
def _site_rules(spec_of_role) -> list:
    """``(regex, spec)`` for the kernel and bias of every layer site of every registered
    family, with ``spec_of_role(role, leaf)`` (None: no rule)."""
    from efficient_nlp.models import family as F

    grouped: dict = {}
    for fam in F.families().values():
        stack = re.escape(fam.path(fam.layers))
        for role, sub in fam.layer_sites.items():
            for leaf in ("kernel", "bias"):
                spec = spec_of_role(role, leaf)
                if spec is not None:
                    grouped.setdefault((sub, leaf, spec), []).append(stack)
    return [PresetRule((rf"(^|\.)({'|'.join(sorted(set(stacks)))})\.\d+\.{re.escape(sub)}\.{leaf}$", spec))
            for (sub, leaf, spec), stacks in grouped.items()]


def _tensor_spec(role, leaf):
    if role in COLUMN_ROLES:
        return (None, MODEL_AXIS) if leaf == "kernel" else (MODEL_AXIS,)
    if role in ROW_ROLES and leaf == "kernel":
        return (MODEL_AXIS, None)
    return None


def preset_rules(name: str) -> list:
    """The ``(regex, spec)`` rules of a preset (module docstring); ``[]`` for ``"replicated"``.
    They may follow or precede user rules in one list: ``[(r"classifier", ...)] +
    preset_rules("tensor")``."""
    if name == "replicated":
        return []
    if name == "fsdp":
        return [PresetRule((".", fsdp()))]
    if name == "tensor":
        return _site_rules(_tensor_spec)
    if name == "fsdp+tensor":
        def combined(role, leaf):
            spec = _tensor_spec(role, leaf)
            return None if spec is None else fsdp(base=spec)
        return _site_rules(combined) + [PresetRule((".", fsdp()))]
    raise ShardingError(f"unknown sharding preset {name!r}; presets are {list(PRESETS)}, or give a list of "
                        "(regex, spec) rules")


def rules_of(sharding) -> list:
    """The ``(regex, spec)`` rules of ``config.train.sharding``: a preset name or a list of rules
    (a user rule that matches no leaf is an error, as in `efficient_nlp.tree`; `PresetRule`\ s
    may match nothing)."""
    if sharding is None:
        return []
    if isinstance(sharding, str):
        return preset_rules(sharding)
    rules = []
    for i, rule in enumerate(sharding):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ShardingError(f"sharding rule {i} must be a (regex, spec) pair, e.g. (r'query\\.kernel$', "
                                f"(None, 'model')), got {rule!r}")
        rules.append(rule if isinstance(rule, PresetRule) else (rule[0], rule[1]))
    return rules


def _leaf_specs(named, rules, mesh, used) -> list:
    """Specs of ``named`` ``[(name, leaf)]``; adds the indices of the rules that matched to ``used``."""
    if not rules:
        return [PartitionSpec() for _ in named]
    compiled = tree_lib.compile_rules(rules)
    out = []
    for name, leaf in named:
        shape = np.shape(leaf)
        rule = next((r for r in compiled if r.matches(name)), None)
        if rule is None or not shape:
            out.append(PartitionSpec())
            continue
        used.add(rule.index)
        out.append(resolve_spec(name, shape, rule.payload, mesh))
    return out


def _follow(named_opt, param_specs_by_name) -> list:
    """Optimizer leaves take the spec of the parameter whose path ends theirs (same shape)."""
    out = []
    for name, leaf in named_opt:
        parts = name.split(".")
        spec = PartitionSpec()
        for i in range(len(parts)):
            hit = param_specs_by_name.get(".".join(parts[i:]))
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                spec = hit[1]
                break
        out.append(spec)
    return out


def _unflatten(tree, specs):
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), specs)


def param_specs(state, rules, mesh: Mesh | None = None):
    """A pytree of `PartitionSpec` with the structure of ``state``.

    ``state``: a parameter tree (``nnx.State``, dict of arrays) or a `TrainState` (module
    docstring for how its parts are treated). ``rules``: a preset name or ``(regex, spec)``
    rules (`rules_of`). Every spec is resolved and checked against ``mesh`` (`resolve_spec`;
    default: `make_mesh` of all devices along ``data``).
    """
    from efficient_nlp.train.step import TrainState

    mesh = make_mesh() if mesh is None else mesh
    rules = rules_of(rules)
    used: set = set()
    if isinstance(state, TrainState):
        named_params = tree_lib.named_leaves(state.params)
        p_specs = _leaf_specs(named_params, rules, mesh, used)
        r_specs = _leaf_specs(tree_lib.named_leaves(state.rest), rules, mesh, used)
        by_name = {n: (tuple(np.shape(x)), s) for (n, x), s in zip(named_params, p_specs)}
        o_specs = _follow(tree_lib.named_leaves(state.opt_state), by_name)
        out = TrainState(PartitionSpec(), _unflatten(state.params, p_specs), _unflatten(state.rest, r_specs),
                         _unflatten(state.opt_state, o_specs))
        names = [n for n, _ in named_params] + tree_lib.names(state.rest)
    else:
        named = tree_lib.named_leaves(state)
        out = _unflatten(state, _leaf_specs(named, rules, mesh, used))
        names = [n for n, _ in named]
    _check_used(rules, used, names)
    return out


def _check_used(rules, used, names):
    unused = [f"rule {i} {rule[0]!r}" for i, rule in enumerate(rules)
              if i not in used and not isinstance(rule, PresetRule)]
    if unused:
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise tree_lib.RuleError(f"sharding {'; '.join(unused)} matches no array (or only earlier rules' or "
                                 f"scalars); paths look like: {shown}")


def shardings(state, mesh: Mesh, rules):
    """`param_specs` as a pytree of `NamedSharding` on ``mesh``."""
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_state(state, mesh: Mesh, rules):
    """A copy of ``state`` placed on ``mesh`` by ``rules`` (new buffers: safe to donate;
    multi-host: every process passes the same values)."""
    return distributed.put(state, shardings(state, mesh, rules))


__all__ = ["COLUMN_ROLES", "DEFAULT_MESH", "FSDP_MIN_SIZE", "MESH_AXES", "PRESETS", "PresetRule", "ROW_ROLES",
           "ShardingError", "fsdp", "make_mesh", "mesh_shape", "param_specs", "preset_rules",
           "resolve_spec", "rules_of", "shard_state", "shardings"]
