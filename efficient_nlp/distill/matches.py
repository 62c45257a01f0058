"""Declarative student <-> teacher matches and loss-weight / temperature schedules.

A match says *what is matched to what* (in the spirit of TextBrewer's intermediate matches)::

    Match(feature="hidden", teacher_layer=4, student_layer=2, loss="hidden_mse", weight=1.0)
    Match(feature="attn_probs", teacher_layer=5, student_layer=2, loss="attention_kl")
    Match(feature="logits", loss="kl", temperature=dict(kind="linear", start=4.0, end=1.0, steps=500))

Configs hold plain dicts (``Match.to_dict`` / ``Match.from_dict`` round-trip); `check_matches`
validates a list against the student's and teacher's `BertConfig` so that a wrong layer
index, an unknown feature or loss, or a width mismatch without projection fails at config time.

Layer indices: ``hidden`` counts hidden states, 0 = embedding output ... L = last layer;
per-layer features (``attn_scores``, ``attn_probs``, ``values``, ``queries``, ``keys``,
``mha_out``, ``ffn_intermediate``, ``ffn_out``) count layers 0 ... L-1; negative indices count
from the end; ``embedding`` and ``logits`` take no layer (None).

`register_loss` adds a user's loss under a new ``loss`` name (see docs/extending.md).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from efficient_nlp.distill import losses as L

# feature -> (capture name needed, layer kind: None | "hidden" | "layer")
FEATURES = {
    "embedding": ("embedding", None),
    "hidden": ("hidden_states", "hidden"),
    "attn_scores": ("attn_scores", "layer"),
    "attn_probs": ("attn_probs", "layer"),
    "values": ("values", "layer"),
    "queries": ("hidden_states", "layer"),   # the q / k site on its input (MiniLMv2; `family.site_input`)
    "keys": ("hidden_states", "layer"),
    "mha_out": ("mha_out", "layer"),
    "ffn_intermediate": ("ffn_intermediate", "layer"),
    "ffn_out": ("ffn_out", "layer"),
    "logits": (None, None),
}
TOKEN_FEATURES = ("embedding", "hidden", "mha_out", "ffn_intermediate", "ffn_out")
ATTENTION_FEATURES = ("attn_scores", "attn_probs")
VECTOR_FEATURES = ("queries", "keys", "values")

# loss name -> features it accepts
LOSSES = {
    "soft_ce": ("logits",),
    "kl": ("logits",),
    "logits_mse": ("logits",),
    "hidden_mse": TOKEN_FEATURES,
    "cosine": TOKEN_FEATURES,
    "pkd": TOKEN_FEATURES,
    "attention_mse": ATTENTION_FEATURES,
    "attention_kl": ATTENTION_FEATURES,
    "value_relation_kl": ("values",),
    "relation_kl": VECTOR_FEATURES,
}
PROJECTABLE_LOSSES = ("hidden_mse", "cosine", "pkd")
#: Losses added with `register_loss`: name -> ``fn(student, teacher, mask) -> scalar``.
REGISTERED_LOSSES: dict[str, Callable] = {}


def register_loss(name: str, fn: Callable, features) -> None:
    """Makes ``name`` a match ``loss`` (``Match(feature=..., loss=name, weight=...)``) for ``features``.

    ``fn(student, teacher, mask) -> scalar`` is pure and jit-able: the student's and the
    teacher's feature tensors (see `FEATURES`; the teacher's under ``stop_gradient``) and the
    batch's attention mask ``[B, T]`` (1 = token, 0 = padding), which token losses use to skip
    padding.  ``features``: the names in `FEATURES` the loss accepts; `check_matches` refuses
    any other, and widths must agree (no projection for registered losses).  The distiller
    adds ``weight(step) * fn(...)`` to the loss (docs/distillation.md).  Registration lasts for the
    process (a notebook cell works).  A taken name, an unknown feature or a ``fn`` that cannot
    take three positional arguments raises ``ValueError``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"loss name must be an identifier string, got {name!r}")
    if name in LOSSES:
        raise ValueError(f"distillation loss {name!r} already exists; pick another name (taken: {sorted(LOSSES)})")
    features = (features,) if isinstance(features, str) else tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if not features or unknown:
        raise ValueError(f"register_loss({name!r}): features {list(features)} must be a non-empty list of "
                         f"{sorted(FEATURES)}")
    try:
        inspect.signature(fn).bind("student", "teacher", "mask")
    except (TypeError, ValueError) as e:
        raise ValueError(f"register_loss({name!r}): fn must be callable as fn(student, teacher, mask) -> "
                         f"scalar ({e})") from None
    LOSSES[name] = features
    REGISTERED_LOSSES[name] = fn


# ----------------------------------------------------------------------------- schedules
def _plain(spec):
    """A ConfigDict spec as a plain dict (configs convert dicts to ConfigDicts)."""
    return spec.to_dict() if hasattr(spec, "to_dict") else spec


def check_schedule(spec, what="schedule"):
    """Validates a schedule spec (number or dict); raises ValueError with the accepted forms."""
    spec = _plain(spec)
    forms = ("a number; dict(kind='constant', value=v); dict(kind='linear', start=a, end=b, "
             "steps=n[, begin=s]); dict(kind='piecewise', boundaries=[s1, ...], values=[v0, v1, ...])")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return
    if not isinstance(spec, Mapping):
        raise ValueError(f"{what}: {spec!r} is not a schedule; use {forms}")
    spec = dict(spec)
    kind = spec.get("kind")
    required = {"constant": {"value"}, "linear": {"start", "end", "steps"},
                "piecewise": {"boundaries", "values"}}
    if kind not in required:
        raise ValueError(f"{what}: unknown schedule kind {kind!r}; use {forms}")
    allowed = required[kind] | {"kind"} | ({"begin"} if kind == "linear" else set())
    if not required[kind] <= set(spec) or not set(spec) <= allowed:
        raise ValueError(f"{what}: schedule {spec!r} needs keys {sorted(required[kind])}; use {forms}")
    if kind == "linear" and int(spec["steps"]) < 1:
        raise ValueError(f"{what}: linear schedule needs steps >= 1, got {spec['steps']}")
    if kind == "piecewise" and len(spec["values"]) != len(spec["boundaries"]) + 1:
        raise ValueError(f"{what}: piecewise schedule needs len(values) == len(boundaries) + 1")


def make_schedule(spec) -> Callable[[Any], jnp.ndarray]:
    """``schedule(step) -> float32 scalar`` from a spec (see `check_schedule`); jit-able.

    ``linear`` goes from ``start`` at step ``begin`` (default 0) to ``end`` at ``begin + steps``
    and stays there (TextBrewer's linear growth/decay); ``piecewise`` takes ``values[i]`` for
    ``boundaries[i-1] <= step < boundaries[i]`` (a two-stage switch inside one run).
    """
    spec = _plain(spec)
    check_schedule(spec)
    if not isinstance(spec, Mapping):
        value = float(spec)
        return lambda step: jnp.asarray(value, jnp.float32)
    spec = dict(spec)
    if spec["kind"] == "constant":
        value = float(spec["value"])
        return lambda step: jnp.asarray(value, jnp.float32)
    if spec["kind"] == "linear":
        a, b, n, s0 = float(spec["start"]), float(spec["end"]), float(spec["steps"]), float(spec.get("begin", 0))

        def linear(step):
            frac = jnp.clip((jnp.asarray(step, jnp.float32) - s0) / n, 0.0, 1.0)
            return a + (b - a) * frac
        return linear
    bounds = jnp.asarray([float(x) for x in spec["boundaries"]], jnp.float32)
    values = jnp.asarray([float(x) for x in spec["values"]], jnp.float32)

    def piecewise(step):
        return values[jnp.sum(jnp.asarray(step, jnp.float32) >= bounds)]
    return piecewise


# ----------------------------------------------------------------------------- matches
@dataclasses.dataclass(frozen=True)
class Match:
    """One term of the distillation loss: ``weight(step) * loss(student feature, teacher feature)``.

    Attributes:
      feature: one of `FEATURES`.
      loss: one of `LOSSES` (must accept the feature).
      teacher_layer, student_layer: indices (see the module docstring); None for
        ``embedding`` and ``logits``.
      weight: schedule spec (number or dict, see `make_schedule`).
      projection: learn a linear map student width -> teacher width (FitNet/TinyBERT);
        only for token features with ``hidden_mse``/``cosine``/``pkd``.
      temperature: schedule spec; logits losses only.
      t2_scale: multiply soft_ce/kl by T^2.
      relation_heads: MiniLMv2 relation heads for ``relation_kl``.
      name: label in the logs (default ``<feature><s>_<t>/<loss>``).
    """

    feature: str
    loss: str
    teacher_layer: int | None = None
    student_layer: int | None = None
    weight: Any = 1.0
    projection: bool = False
    temperature: Any = 1.0
    t2_scale: bool = False
    relation_heads: int = 1
    name: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Match":
        if isinstance(d, Match):
            return d
        d = dict(d)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown match key(s) {unknown}; valid keys are {valid}")
        for key in ("feature", "loss"):
            if key not in d:
                raise ValueError(f"match {d} has no {key!r}")
        return cls(**d)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        layers = "" if self.student_layer is None else f"{self.student_layer}_{self.teacher_layer}"
        return f"{self.feature}{layers}/{self.loss}"


def _layer_count(feature, config):
    kind = FEATURES[feature][1]
    if kind is None:
        return None
    return config.num_hidden_layers + (1 if kind == "hidden" else 0)


def _resolve_layer(index, feature, config, side, where):
    count = _layer_count(feature, config)
    if count is None:
        if index not in (None, 0):
            raise ValueError(f"{where}: feature {feature!r} takes no {side}_layer (got {index})")
        return None
    what = ("hidden states (0 = embedding output)" if FEATURES[feature][1] == "hidden" else "layers")
    if not isinstance(index, int) or isinstance(index, bool) or not -count <= index < count:
        raise ValueError(
            f"{where}: {side}_layer={index!r} is out of range for feature {feature!r}: the "
            f"{side} has {count} {what}, valid indices are 0..{count - 1} (or negative)")
    return index % count


def _width(feature, config):
    if feature == "ffn_intermediate":
        return config.intermediate_size
    if feature in TOKEN_FEATURES:
        return config.hidden_size
    return None


def check_matches(matches, student_config, teacher_config) -> tuple[Match, ...]:
    """Validates matches (dicts or `Match`) against both models' configs; returns resolved ones.

    Layer indices come back non-negative.  Raises ValueError naming the match and the problem:
    unknown feature / loss, a loss that does not take the feature, a layer out of range,
    widths that differ without ``projection=True``, head counts or relation heads that do not
    fit, a bad schedule.
    """
    out = []
    for i, raw in enumerate(matches):
        m = Match.from_dict(raw)
        where = f"match {i} ({m.label})"
        if m.feature not in FEATURES:
            raise ValueError(f"{where}: unknown feature {m.feature!r}; valid features are {sorted(FEATURES)}")
        if m.loss not in LOSSES:
            raise ValueError(f"{where}: unknown loss {m.loss!r}; valid losses are {sorted(LOSSES)}")
        if m.feature not in LOSSES[m.loss]:
            raise ValueError(f"{where}: loss {m.loss!r} takes features {LOSSES[m.loss]}, not {m.feature!r}")
        t_layer = _resolve_layer(m.teacher_layer, m.feature, teacher_config, "teacher", where)
        s_layer = _resolve_layer(m.student_layer, m.feature, student_config, "student", where)
        check_schedule(m.weight, f"{where}: weight")
        check_schedule(m.temperature, f"{where}: temperature")
        ws, wt = _width(m.feature, student_config), _width(m.feature, teacher_config)
        if m.projection and m.loss not in PROJECTABLE_LOSSES:
            raise ValueError(f"{where}: projection is only for losses {PROJECTABLE_LOSSES}")
        if ws is not None and ws != wt and not m.projection:
            raise ValueError(f"{where}: student width {ws} != teacher width {wt}; set projection=True")
        if m.feature in ATTENTION_FEATURES + ("values",) and m.loss != "relation_kl":
            ns, nt = student_config.num_attention_heads, teacher_config.num_attention_heads
            if ns != nt:
                raise ValueError(f"{where}: loss {m.loss!r} compares heads one to one, but the student "
                                 f"has {ns} heads and the teacher {nt}; use relation_kl")
        if m.loss == "relation_kl":
            r = m.relation_heads
            for side, cfg in (("student", student_config), ("teacher", teacher_config)):
                if not isinstance(r, int) or r < 1 or cfg.attention_width % r:
                    raise ValueError(f"{where}: relation_heads={r!r} must divide the {side}'s "
                                     f"attention width {cfg.attention_width}")
        out.append(dataclasses.replace(m, teacher_layer=t_layer, student_layer=s_layer))
    labels = [m.label for m in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"duplicate match labels {dupes}; give the matches distinct names")
    return tuple(out)


def captures(matches, side) -> tuple[str, ...]:
    """The ``capture=`` names the student (``side='student'``) or teacher needs for ``matches``."""
    del side  # same names on both sides
    return tuple(sorted({FEATURES[m.feature][0] for m in matches} - {None}))


def needs_intermediates(matches) -> bool:
    return any(m.feature != "logits" for m in matches)


# ----------------------------------------------------------------------------- layer maps
def uniform_hidden_map(num_teacher_layers, num_student_layers):
    """TinyBERT's uniform map over hidden states: student ``i`` <- teacher ``i * L_t / L_s``.

    Returns ``(student, teacher)`` pairs for i = 0 (embedding output) ... L_s.
    """
    L._check_layer_counts(num_teacher_layers, num_student_layers)
    k = num_teacher_layers // num_student_layers
    return tuple((i, i * k) for i in range(num_student_layers + 1))


def layer_matches(feature, loss, pairs, **kw) -> list[dict]:
    """Config dicts for one feature/loss over ``(student_layer, teacher_layer)`` pairs."""
    return [Match(feature=feature, loss=loss, student_layer=s, teacher_layer=t, **kw).to_dict()
            for s, t in pairs]


def pkd_matches(num_teacher_layers, num_student_layers, *, strategy="skip", weight=1.0) -> list[dict]:
    """PKD (Sun et al. 2019): normalised [CLS] matches to the teacher's last-k or every k-th layer.

    Student layer i's output (hidden state i+1) meets the teacher layer of `pkd_skip` /
    `pkd_last_k`; the last pair is left out, as in the paper (the logits cover it).
    """
    maps = {"skip": L.pkd_skip, "last": L.pkd_last_k}
    if strategy not in maps:
        raise ValueError(f"unknown PKD strategy {strategy!r}; use one of {sorted(maps)}")
    teacher = maps[strategy](num_teacher_layers, num_student_layers)
    pairs = [(i + 1, t + 1) for i, t in enumerate(teacher)][:-1]
    return layer_matches("hidden", "pkd", pairs, weight=weight)
