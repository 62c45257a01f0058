"""Path-regex rules over pytree leaves (one selection mechanism shared by every transform; docs/contracts.md).

A leaf's *name* is its key path joined by dots (`path_str`): dict keys, attribute names and
sequence indices, e.g. ``bert.encoder.layers.3.attention.query.kernel`` for the parameters of
`efficient_nlp.models` (the ``.value`` attribute of an ``nnx.Variable`` wrapper is dropped, so an
``nnx.State`` and a plain dict of arrays give the same names).

A *rule* is a regular expression, matched with ``re.search`` against the name (anchor with ``^`` /
``$`` when needed), optionally paired with a payload: ``"kernel$"`` or ``("kernel$", payload)``.
A rule list is ordered and the FIRST matching rule wins (as in qwix / aqt quantization rules),
so specific rules go before general ones.  A rule that matches no leaf is almost always a typo,
so it is an error (`RuleError`, listing some valid names) unless ``allow_unused=True``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax

# Attribute names of Variable-like wrappers whose payload is the real leaf (flax nnx).
_WRAPPER_ATTRS = ("value", "raw_value")
_MAX_LISTED = 12


class RuleError(ValueError):
    """A rule is not a valid regular expression, or it matches no leaf."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A compiled rule: ``regex`` (the source string), ``payload`` and its position ``index``."""

    regex: str
    payload: Any = True
    index: int = 0

    @property
    def compiled(self) -> re.Pattern:
        return re.compile(self.regex)

    def matches(self, name: str) -> bool:
        return self.compiled.search(name) is not None


def path_str(key_path) -> str:
    """Dotted name of a jax key path (``DictKey``, ``GetAttrKey``, ``SequenceKey``, ...)."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - future key types
            parts.append(str(k))
    if len(parts) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and parts[-1] in _WRAPPER_ATTRS:
        parts.pop()
    return ".".join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


def names(tree) -> list[str]:
    """The names of all leaves, in flatten order."""
    return [n for n, _ in named_leaves(tree)]


def compile_rules(rules) -> list[Rule]:
    """Normalises rules to a list of `Rule`.

    Accepts one regex string, a sequence of regex strings and/or ``(regex, payload)`` pairs, a
    dict ``{regex: payload}``, or `Rule` objects.  A plain regex gets payload ``True``.
    Raises `RuleError` for an invalid regular expression or a malformed rule.
    """
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    elif isinstance(rules, dict):
        rules = list(rules.items())
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, Rule):
            regex, payload = rule.regex, rule.payload
        elif isinstance(rule, str):
            regex, payload = rule, True
        elif isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
            regex, payload = rule
        else:
            raise RuleError(f"rule {i} must be a regex string or a (regex, payload) pair, got {rule!r}")
        try:
            re.compile(regex)
        except re.error as e:
            raise RuleError(f"rule {i} {regex!r} is not a valid regular expression: {e}") from None
        out.append(Rule(regex, payload, i))
    if not out:
        raise RuleError("no rules given")
    return out


def match(tree, rules, *, allow_unused: bool = False) -> dict[str, Rule]:
    """``{name: first matching Rule}`` for every leaf some rule matches (flatten order).

    Raises `RuleError` when a rule matches no leaf (unless ``allow_unused``), naming the rule
    and listing some leaf names.
    """
    compiled = compile_rules(rules)
    regexes = [(r, r.compiled) for r in compiled]
    leaf_names = names(tree)
    found: dict[str, Rule] = {}
    used = set()
    for name in leaf_names:
        for rule, rx in regexes:
            if rx.search(name):
                found[name] = rule
                used.add(rule.index)
                break
    if not allow_unused:
        unused = [r for r in compiled if r.index not in used]
        if unused:
            shown = ", ".join(leaf_names[:_MAX_LISTED]) + (" ..." if len(leaf_names) > _MAX_LISTED else "")
            what = "; ".join(
                f"rule {r.index} {r.regex!r}" + (
                    " (every leaf it matches is taken by an earlier rule)"
                    if any(r.matches(n) for n in leaf_names) else "")
                for r in unused)
            raise RuleError(f"{what} matches no leaf. Leaf names look like: {shown}")
    return found


def select(tree, rules, *, default: Any = False, allow_unused: bool = False):
    """A pytree like ``tree`` holding, per leaf, the payload of its first matching rule.

    With plain regex rules this is a boolean mask (True = selected, ``default`` = False); with
    ``(regex, payload)`` rules it is a label tree (``default`` for leaves no rule matches), e.g.
    for ``optax.multi_transform`` or per-rule sparsities.  See `match` for the errors.
    """
    found = match(tree, rules, allow_unused=allow_unused)

    def label(path, _):
        rule = found.get(path_str(path))
        return default if rule is None else rule.payload

    return jax.tree_util.tree_map_with_path(label, tree)
