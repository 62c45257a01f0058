"""Quantization specs: which quantizer goes where (docs/quantization.md, "Specs and the model transform").

A model has *sites*, each named by a dotted module path plus a suffix:

* ``<linear>``            the weight (kernel) of an ``nnx.Linear``: role ``weight``;
* ``<linear>.input``      the input activation of that Linear: role ``activation``, or
                          ``activation_unsigned`` where the model's family says the input is
                          mostly non-negative (``Family.unsigned_input_roles``: the FFN
                          output Linear, fed by GELU / ReLU);
* ``<embed>``             the table of an ``nnx.Embed``: role ``embedding`` (row-wise scales;
                          group-wise scales are for Linear kernels only);
* ``<attention>.{q,k,v}`` the inputs of the two activation-activation matmuls of the
                          family's attention module (role ``activation``) and
                          ``<attention>.probs`` the post-softmax probabilities (role
                          ``activation_unsigned``).

`QuantSpec` gives one `Quantizer` per role (W-E-A bit widths, the literature's defaults) and a
list of rules ``(regex, payload)`` matched against site names with `efficient_nlp.tree.rules`
(first match wins; a rule matching no site is an error).  A payload is ``None`` (leave the
site in float), a dict of `Quantizer` fields to override (``{"bits": 8}``) or a `Quantizer`.
After the user's rules the default skips apply: the classifier, position and token-type
embeddings (LayerNorm and biases are never quantized).  Sites with a ``None`` role quantizer
(e.g. activations at 16 or 32 bits) are left in float.

Users add stateless quantizers with `register_quantizer` (docs/extending.md); their names are
then valid ``method`` values everywhere a built-in one is (fake quantization only: the packed
export and the integer model know the built-in codes only).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

from efficient_nlp.tree import rules as rules_lib

METHODS = ("uniform", "lsq", "pact", "twn", "bwn")
ROLES = ("weight", "embedding", "activation", "activation_unsigned")
GRANULARITIES = ("tensor", "channel", "group", "token", "example")
#: Granularities of weight and embedding sites.
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
#: Granularities of activation sites: a dynamic range per token or per example (``tensor`` on an
#: activation site means ``example``: a range never spans the batch).
ACTIVATION_GRANULARITIES = ("token", "example", "tensor")
#: Methods that take group-wise scales (``granularity="group"``): a grid with a per-scale range.
GROUP_METHODS = ("uniform", "lsq")

#: Quantizers added with `register_quantizer`: name -> ``fn(x, bits, signed, axis) -> x_hat``.
QUANTIZERS: dict[str, Callable] = {}


def register_quantizer(name: str, fn: Callable) -> None:
    """Makes ``name`` a quantizer ``method`` for fake quantization (weights, embeddings, activations).

    ``fn(x, bits, signed, axis) -> x_hat`` must be pure and jit-able: ``x`` the float tensor,
    ``bits`` 1..8, ``signed`` the grid (False: asymmetric, for attention probabilities and
    post-GELU inputs), ``axis`` the axes reduced for one range (weights: None per tensor, the
    per-channel axis; activations: a tuple, the last axis per token or all axes but the first
    per example, `quantizers.activation_axis`).  Its
    gradient is the caller's choice; most quantizers want a straight-through one
    (``x + stop_gradient(x_hat - x)``, docs/quantization.md).  Registration lasts for the process (a
    notebook cell works; no entry points).  A name already taken (built-in or registered) or a
    ``fn`` that cannot take the four positional arguments raises ``ValueError``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"quantizer name must be an identifier string, got {name!r}")
    if name in METHODS or name in QUANTIZERS:
        raise ValueError(f"quantizer method {name!r} already exists; pick another name "
                         f"(taken: {sorted(METHODS + tuple(QUANTIZERS))})")
    try:
        inspect.signature(fn).bind("x", "bits", "signed", "axis")
    except (TypeError, ValueError) as e:
        raise ValueError(f"register_quantizer({name!r}): fn must be callable as "
                         f"fn(x, bits, signed, axis) -> x_hat ({e})") from None
    QUANTIZERS[name] = fn


def _methods() -> tuple[str, ...]:
    return METHODS + tuple(QUANTIZERS)


#: Sites left in float unless a user rule says otherwise (the literature's defaults, docs/quantization.md).
DEFAULT_SKIP = (
    r"(^|\.)classifier(\.input)?$",
    r"(^|\.)(position|token_type)_embeddings$",
)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """One quantizer.

    method: ``uniform`` (range from the tensor each call: abs-max symmetric / min-max
      asymmetric), ``lsq`` (learned step; LSQ+ offset when unsigned), ``pact`` (learned clip
      range), ``twn`` (ternary), ``bwn`` (binary), or a name added with `register_quantizer`.
    bits: 1..8 (``twn`` implies 2, ``bwn`` 1).
    signed: symmetric grid around 0 (False: asymmetric ``[0, 2^b-1]`` grid over ``[min, max]``).
    granularity: for weights and embeddings ``tensor`` (one scale), ``channel`` (one per
      output column of a kernel, one per row of an embedding table) or ``group`` (one per
      ``group_size`` consecutive input rows and output column of a Linear kernel: the RTN / GPTQ
      "g128" setting).  For activations the dynamic range (``uniform`` and registered methods)
      of ``token`` (one per token: the last axis reduced; `make_spec`'s default) or
      ``example`` (one per batch row: all axes but the first; ``tensor`` on an activation site
      means ``example``).  Activation ranges never span the batch, so a row's output does not
      depend on the rest of its batch; per token they do not depend on padding either.  Learned
      activation quantizers (``lsq``, ``pact``) have static scales, whatever the granularity.
    group_size: the rows sharing a scale with ``granularity="group"`` (>= 1, must divide the
      kernel's ``d_in``); 0 otherwise.  ``uniform`` and ``lsq`` only.
    """

    method: str = "uniform"
    bits: int = 8
    signed: bool = True
    granularity: str = "tensor"
    group_size: int = 0

    def __post_init__(self):
        if self.method not in _methods():
            raise ValueError(f"unknown quantizer method {self.method!r}; valid: {_methods()} "
                             "(add one with efficient_nlp.quant.spec.register_quantizer)")
        if self.method == "twn" and self.bits != 2:
            raise ValueError(f"twn is ternary (2 bits), got bits={self.bits}")
        if self.method == "bwn" and self.bits != 1:
            raise ValueError(f"bwn is binary (1 bit), got bits={self.bits}")
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")
        if self.bits == 1 and self.method in METHODS and self.method != "bwn":
            raise ValueError(f"1-bit {self.method!r} is degenerate; use method='bwn' for 1 bit")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise ValueError(f"group_size must be an int >= 0, got {g!r}")
        if self.granularity == "group":
            if g < 1:
                raise ValueError("granularity='group' needs group_size >= 1 (e.g. 128: one scale per 128 "
                                 "consecutive inputs and output column)")
            if self.method not in GROUP_METHODS:
                raise ValueError(f"{self.method!r} has no group-wise scales; granularity='group' works with "
                                 f"{GROUP_METHODS} (use 'tensor' or 'channel' for {self.method!r})")
        elif g:
            raise ValueError(f"group_size={g} needs granularity='group', got granularity={self.granularity!r}; "
                             f"give granularity='group' or drop group_size")

    def replace(self, **kw) -> "Quantizer":
        """A copy with ``kw`` changed.  A positive ``group_size`` alone implies
        ``granularity="group"``; another granularity alone drops the group size."""
        unknown = sorted(set(kw) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown Quantizer field(s) {unknown}; valid: {', '.join(FIELDS)}")
        if kw.get("group_size") and "granularity" not in kw:
            kw["granularity"] = "group"
        if kw.get("granularity", "group") != "group" and "group_size" not in kw:
            kw["group_size"] = 0
        return dataclasses.replace(self, **kw)

    @property
    def name(self) -> str:
        """E.g. ``uniform8``, ``uniform8u`` (unsigned), ``twn2/ch``, ``uniform4/g128``,
        ``uniform8/ex`` (per-example activation ranges; per token has no suffix)."""
        s = f"{self.method}{self.bits}"
        if not self.signed:
            s += "u"
        if self.granularity == "group":
            return s + f"/g{self.group_size}"
        return s + {"channel": "/ch", "example": "/ex"}.get(self.granularity, "")


FIELDS = tuple(f.name for f in dataclasses.fields(Quantizer))


def activation_quantizer(q: Quantizer | None, where: str) -> Quantizer | None:
    """``q`` for an activation site: ``tensor`` becomes ``example`` (one range per batch row); a
    weight granularity (``channel``, ``group``) is a ValueError naming ``where`` and the fix."""
    if q is None or q.granularity in ("token", "example"):
        return q
    if q.granularity == "tensor":
        return q.replace(granularity="example")
    raise ValueError(f"{where}: the activation quantizer {q.name} has granularity {q.granularity!r}; activations "
                     f"take {ACTIVATION_GRANULARITIES} (a dynamic range per token or per example, 'tensor' = "
                     f"per example); {WEIGHT_GRANULARITIES} are for weights")


def weight_granularity_check(q: Quantizer | None, where: str) -> None:
    """A ValueError naming ``where`` when a weight / embedding quantizer has an activation
    granularity (``token``, ``example``)."""
    if q is not None and q.granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"{where}: the weight quantizer {q.name} has granularity {q.granularity!r}; weights and "
                         f"embeddings take {WEIGHT_GRANULARITIES} ('token' and 'example' are for activations)")


def weight_quantizer(bits: int, method: str | None = None, granularity: str | None = None,
                     group_size: int = 0) -> Quantizer | None:
    """The default weight quantizer for ``bits``: 1 -> bwn, 2 -> twn, else uniform abs-max;
    32 (or None) -> None (float).

    ``granularity`` None picks by method: one scale per output channel for the grid quantizers
    (``uniform``, ``lsq``), as AQT/Qwix and most PTQ work do, and one per tensor for TWN / BWN
    (TernaryBERT / BinaryBERT layer-wise scales); a positive ``group_size`` picks ``group``
    (one scale per ``group_size`` consecutive inputs and output column).  Per tensor, 4-bit
    abs-max is ruined by BERT's outlier weights: the fine-tuned MiniLM drops from 0.811 to 0.394
    dev accuracy at W-E-A 4-4-8 with per-tensor scales and to 0.795 with per-channel ones (no
    training).
    """
    if bits is None or bits >= 32:
        return None
    method = method or {1: "bwn", 2: "twn"}.get(bits, "uniform")
    if granularity is None:
        granularity = "group" if group_size else "channel" if method in ("uniform", "lsq") else "tensor"
    return Quantizer(method, bits, True, granularity, group_size)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Quantizers per role and the rules that override them per site (see module docstring)."""

    weight: Quantizer | None = None
    embedding: Quantizer | None = None
    activation: Quantizer | None = None
    activation_unsigned: Quantizer | None = None
    rules: tuple = ()

    @property
    def bits(self) -> str:
        """The W-E-A name, e.g. ``2-2-8``."""
        def b(q):
            return "32" if q is None else str(q.bits)
        return f"{b(self.weight)}-{b(self.embedding)}-{b(self.activation)}"


def _float_activations(a_bits) -> bool:
    """Whether ``a_bits`` keeps activations in float: None, 16 (W4A16 = weight-only) or >= 32;
    9..15 and 17..31 are an error (quantized activations have 1..8 bits)."""
    if a_bits is None or a_bits == 16 or a_bits >= 32:
        return True
    if a_bits > 8:
        raise ValueError(f"a_bits={a_bits!r}: activations are quantized at 1..8 bits or kept in float with "
                         f"16, 32 or None")
    return False


def make_spec(w_bits: int = 8, e_bits: int | None = None, a_bits: int | None = 8, *,
              weight_method: str | None = None, activation_method: str = "uniform",
              weight_granularity: str | None = None, weight_group_size: int = 0,
              activation_granularity: str = "token", rules: Any = ()) -> QuantSpec:
    """A W-E-A spec with the literature's defaults (docs/quantization.md).

    Weights: ``w_bits`` 1 -> BWN, 2 -> TWN, else uniform symmetric; scales per output channel
    for uniform / LSQ weights and per tensor for TWN / BWN unless ``weight_granularity``
    (``tensor`` | ``channel`` | ``group``) says otherwise (`weight_quantizer`);
    ``weight_group_size = g`` gives Linear kernels group-wise scales (one per ``g`` consecutive
    inputs and output column, e.g. 128: RTN / GPTQ "W4 g128"; ``g`` must divide every quantized
    kernel's ``d_in``, a rule can give a site another setting).  Embeddings: the same method at
    ``e_bits`` (default ``w_bits``) with row-wise scales (never groups).  Activations at
    ``a_bits`` with ``activation_method`` (``uniform``: a range from the data, ``lsq`` or
    ``pact``: learned), symmetric except attention probabilities and post-GELU FFN activations
    (asymmetric); ``activation_granularity`` ``token`` (default: a range per token) or
    ``example`` (per batch row) for the data-derived ranges, never one across the batch.
    ``a_bits`` of 16 or 32 (or None) leaves activations in float: weight-only
    quantization, e.g. ``make_spec(4, 32, 16, weight_group_size=128)`` is W4A16 g128 with float
    embeddings; ``w_bits`` / ``e_bits`` of 32 leave weights / embeddings in float.
    ``rules``: see `QuantSpec`.
    """
    e_bits = w_bits if e_bits is None else e_bits
    weight = weight_quantizer(w_bits, weight_method, weight_granularity, weight_group_size)
    embedding = weight_quantizer(e_bits, weight_method if e_bits == w_bits else None, "channel")
    if activation_granularity not in ACTIVATION_GRANULARITIES:
        raise ValueError(f"activation_granularity must be one of {ACTIVATION_GRANULARITIES} (a range per token "
                         f"or per example; 'tensor' = per example), got {activation_granularity!r}")
    granularity = "example" if activation_granularity == "tensor" else activation_granularity
    if _float_activations(a_bits):
        act = act_u = None
    else:
        act = Quantizer(activation_method, a_bits, True, granularity)
        act_u = Quantizer(activation_method, a_bits, False, granularity)
    return QuantSpec(weight, embedding, act, act_u, tuple(_normalise_rules(rules)))


def spec_from_config(cfg: Mapping) -> QuantSpec:
    """`make_spec` from a config dict with keys w_bits, e_bits, a_bits, weight_method,
    activation_method, weight_granularity, weight_group_size, activation_granularity, rules
    (``[[regex, payload], ...]``); unknown keys are an error; ``""`` or 0 for e_bits /
    weight_method / weight_granularity / weight_group_size / activation_granularity means the
    default."""
    cfg = dict(cfg)
    valid = {"w_bits", "e_bits", "a_bits", "weight_method", "activation_method", "weight_granularity",
             "weight_group_size", "activation_granularity", "rules"}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"unknown quantization config key(s) {unknown}; valid: {sorted(valid)}")
    for key in ("e_bits", "weight_method", "weight_granularity", "weight_group_size", "activation_granularity"):
        if cfg.get(key) in ("", 0):
            cfg.pop(key)
    w_bits = cfg.pop("w_bits", 8)
    return make_spec(w_bits, **cfg)


def _normalise_rules(rules):
    out = []
    for rule in rules_lib.compile_rules(rules) if rules else []:
        payload = rule.payload
        if payload is True:
            raise rules_lib.RuleError(
                f"rule {rule.index} {rule.regex!r} needs a payload: None (keep float), a dict of "
                "Quantizer fields, or a Quantizer")
        if isinstance(payload, Mapping):
            payload = dict(payload)
            implied = {"twn": 2, "bwn": 1}.get(payload.get("method"))
            if implied is not None:
                payload.setdefault("bits", implied)
            unknown = sorted(set(payload) - set(FIELDS))
            if unknown:
                raise ValueError(f"rule {rule.index} {rule.regex!r}: unknown Quantizer field(s) {unknown}; "
                                 f"valid: {', '.join(FIELDS)}")
        elif payload is not None and not isinstance(payload, Quantizer):
            raise rules_lib.RuleError(f"rule {rule.index} {rule.regex!r}: payload must be None, a dict or "
                                      f"a Quantizer, got {payload!r}")
        out.append((rule.regex, payload))
    return out


def resolve(spec: QuantSpec, sites: Mapping[str, str]) -> dict[str, tuple[Quantizer | None, str]]:
    """``{site: (quantizer or None, reason)}`` for every site (``sites`` maps name -> role).

    Reasons: ``"rule <i>"``, ``"default skip"``, ``"role <role>"``.  A user rule matching no
    site raises `RuleError` listing site names; a group-wise quantizer on a site whose role is
    not ``weight`` raises ``ValueError``.
    """
    names = {name: 0 for name in sites}
    found = rules_lib.match(names, list(spec.rules)) if spec.rules else {}
    skips = rules_lib.match(names, list(DEFAULT_SKIP), allow_unused=True)
    out = {}
    for name, role in sites.items():
        if role not in ROLES:
            raise ValueError(f"site {name!r} has unknown role {role!r}")
        base = getattr(spec, role)
        if name in found:
            payload = found[name].payload
            if payload is None:
                q = None
            elif isinstance(payload, Quantizer):
                q = payload
            else:
                start = base or (weight_quantizer(8) if role in ("weight", "embedding") else
                                 Quantizer("uniform", 8, role == "activation", "token"))
                q = start.replace(**payload)
            out[name] = (q, f"rule {found[name].index}")
        elif name in skips:
            out[name] = (None, "default skip")
        else:
            out[name] = (base, f"role {role}")
        q, why = out[name]
        if q is not None and q.granularity == "group" and role != "weight":
            raise ValueError(f"site {name!r} (role {role}) got {q.name}: group-wise scales are for Linear "
                             f"kernels (role weight) only; embeddings keep row-wise scales ('channel') and "
                             f"activations a range per token or per example")
        if role.startswith("activation"):
            out[name] = (activation_quantizer(q, f"site {name!r} ({why})"), why)
        else:
            weight_granularity_check(q, f"site {name!r} ({why})")
    return out
