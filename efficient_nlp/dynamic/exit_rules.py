"""Early-exit rules: when an internal classifier's prediction is good enough to stop.

After each exit ``e`` (0-based index into ``model.exit_layers``) a rule looks at that exit's
logits ``z_e`` [N, C] and says, per row, whether to stop there; the last exit always stops.

* `Entropy` (DeeBERT, Xin et al. 2020): stop when ``entropy(z_e) < threshold``.  Our entropy
  is normalised, ``H(softmax(z)) / log C`` in [0, 1], so one threshold scale serves any number
  of classes (DeeBERT thresholds the raw entropy, in [0, log C]).
* `Confidence` (RightTool, Schwartz et al. 2020): stop when the calibrated top probability
  ``max softmax(z_e / T_e) > threshold``; ``T_e`` is exit e's temperature from
  `fit_temperature` on dev logits (temperature scaling, Guo et al. 2017).
* `Patience` (PABEE, Zhou et al. 2020): stop when ``patience`` consecutive exits (this one
  included) predict the same class.

`decide` is the one implementation of every rule, applied exit by exit with per-row state
(`init_state`; PABEE's last prediction and run length).  `simulate` replays it offline on the
logits of every exit (one forward pass of `efficient_nlp.dynamic.exits.exit_logits`), and
`efficient_nlp.dynamic.exit_runner.EarlyExitRunner` calls it while really stopping, so the
offline sweep and the real runner cannot disagree about a rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def _log_softmax(z, xp):
    z = z - xp.max(z, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def entropy(logits):
    """Normalised entropy ``H(softmax(z)) / log C`` of logits [..., C]: in [0, 1], 0 for a
    one-hot prediction, 1 for the uniform one.

    DeeBERT (Xin et al. 2020) thresholds the raw entropy ``H`` (in [0, log C]); dividing by
    ``log C`` gives one threshold scale for any number of classes.  NumPy in, NumPy out; a JAX
    array in, a JAX array out.
    """
    xp = _xp(logits)
    c = logits.shape[-1]
    if c < 2:
        raise ValueError(f"entropy needs at least 2 classes, got logits of shape {tuple(logits.shape)} "
                         "(a regression head has no class probabilities)")
    logp = _log_softmax(logits, xp)
    return -xp.sum(xp.exp(logp) * logp, axis=-1) / math.log(c)


def max_prob(logits, temperature=1.0):
    """The top class probability ``max softmax(z / T)`` of logits [..., C]."""
    xp = _xp(logits)
    return xp.exp(xp.max(_log_softmax(logits / temperature, xp), axis=-1))


def _nll(z, labels, t) -> float:
    logp = _log_softmax(z / t, np)
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (0.05, 20.0), tol: float = 1e-5) -> float:
    """The temperature ``T`` minimising the mean negative log-likelihood of ``softmax(z / T)``
    on (dev) logits [N, C] and integer labels [N] (temperature scaling, Guo et al. 2017;
    RightTool, Schwartz et al. 2020, calibrates every exit this way).

    The NLL is convex in ``1 / T``, hence unimodal in ``log T``: golden-section search on
    ``log T`` over ``bounds`` (float64) to a relative precision ``tol`` finds the minimum.  A
    result at a bound means the optimum lies outside it.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels).astype(np.int64)
    if z.ndim != 2 or z.shape[-1] < 2 or y.shape != z.shape[:1]:
        raise ValueError(f"fit_temperature needs logits [N, C >= 2] and labels [N], got {z.shape} and {y.shape}")
    if np.any(y < 0) or np.any(y >= z.shape[1]):
        raise ValueError(f"labels must be in [0, {z.shape[1] - 1}], got values in [{y.min()}, {y.max()}]")
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(z, y, math.exp(a)), _nll(z, y, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = _nll(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(z, y, math.exp(b))
    return math.exp((lo + hi) / 2)


# ----------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Entropy:
    """DeeBERT: exit when the normalised `entropy` of the exit's prediction is below
    ``threshold`` (>= 0; 0 never exits early, ``inf`` always exits at the first exit)."""

    threshold: float

    def __post_init__(self):
        if not float(self.threshold) >= 0.0:
            raise ValueError(f"Entropy threshold must be >= 0 (0: never exit early, inf: always exit at the "
                             f"first exit; entropy is normalised to [0, 1]), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))


@dataclasses.dataclass(frozen=True)
class Confidence:
    """RightTool: exit when ``max softmax(z / T_e) > threshold`` (threshold in [0, 1]; 1 never
    exits early, 0 always exits at the first exit).  ``temperatures``: one ``T_e > 0`` per
    exit (`fit_temperature` on each exit's dev logits), or None for T = 1."""

    threshold: float
    temperatures: tuple[float, ...] | None = None

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"Confidence threshold must be in [0, 1] (a probability; 1: never exit early), "
                             f"got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.temperatures is not None:
            temps = tuple(float(t) for t in self.temperatures)
            if not all(t > 0.0 and math.isfinite(t) for t in temps):
                raise ValueError(f"Confidence temperatures must be finite and > 0, got {list(self.temperatures)}")
            object.__setattr__(self, "temperatures", temps)


@dataclasses.dataclass(frozen=True)
class Patience:
    """PABEE: exit when ``patience`` consecutive exits (this one included) predict the same
    class; integer >= 1 (1 exits at the first exit).  PABEE's patience ``t`` counts the
    unchanged predictions after the first, so it is ``Patience(t + 1)`` here."""

    patience: int

    def __post_init__(self):
        p = self.patience
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
            raise ValueError(f"Patience needs an integer patience >= 1 (consecutive agreeing exits; 1 exits at "
                             f"the first exit), got {p!r}")
        object.__setattr__(self, "patience", int(p))


RULES = {"entropy": Entropy, "confidence": Confidence, "patience": Patience}


def check_rule(rule, num_exits: int) -> None:
    """Raise unless ``rule`` is a rule that fits a model with ``num_exits`` exits."""
    if not isinstance(rule, (Entropy, Confidence, Patience)):
        raise TypeError(f"expected an exit rule (Entropy, Confidence or Patience), got {type(rule).__name__}")
    if isinstance(rule, Confidence) and rule.temperatures is not None and len(rule.temperatures) != num_exits:
        raise ValueError(f"Confidence has {len(rule.temperatures)} temperatures but the model has {num_exits} "
                         "exits: give one per exit (the final head included) or None")


def rule_to_dict(rule) -> dict:
    """``{"type": "entropy", "threshold": 0.3}`` (what ``early_exit.json`` stores)."""
    name = next(k for k, cls in RULES.items() if isinstance(rule, cls))
    d = dataclasses.asdict(rule)
    if d.get("temperatures") is not None:
        d["temperatures"] = list(d["temperatures"])
    return {"type": name, **d}


def rule_from_dict(d: Mapping):
    """The inverse of `rule_to_dict`."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind not in RULES:
        raise ValueError(f"unknown exit rule type {kind!r}; types are {sorted(RULES)}")
    return RULES[kind](**d)


# ----------------------------------------------------------------------------- applying a rule
def init_state(rule, n: int, xp=np) -> dict:
    """Per-row state of ``rule`` before the first exit, for ``n`` rows (arrays with one entry
    per row, so a runner can gather them with the rows); ``xp=jnp`` for a rule applied on the
    device."""
    if isinstance(rule, Patience):
        ints = np.int64 if xp is np else jnp.int32
        return {"last": xp.full(n, -1, ints), "count": xp.zeros(n, ints)}
    return {}


def decide(rule, logits, exit_index, state: Mapping, *, last):
    """Apply ``rule`` at exit ``exit_index`` to that exit's logits [n, C].

    Returns ``(exits [n] bool, new_state)``; ``last`` true (the model's own head) exits every
    row.  The one implementation of every rule: `simulate` and the runner's host loop call it on
    NumPy arrays, the runner's on-device loop on JAX arrays (``exit_index`` and ``last`` may then
    be traced values).
    """
    z = logits if isinstance(logits, jax.Array) else np.asarray(logits)
    xp = _xp(z)
    if isinstance(rule, Patience):
        pred = xp.argmax(z, axis=-1).astype(state["last"].dtype)
        count = xp.where(pred == state["last"], state["count"] + 1, 1)
        state = {"last": pred, "count": count}
        exits = count >= rule.patience
    elif isinstance(rule, Entropy):
        exits = entropy(z) < rule.threshold
    elif isinstance(rule, Confidence):
        t = 1.0 if rule.temperatures is None else xp.asarray(rule.temperatures, dtype=z.dtype)[exit_index]
        exits = max_prob(z, t) > rule.threshold
    else:
        raise TypeError(f"expected an exit rule (Entropy, Confidence or Patience), got {type(rule).__name__}")
    exits = xp.logical_or(exits, last)
    return (exits if xp is jnp else np.asarray(exits, bool)), state


@dataclasses.dataclass(frozen=True)
class Decision:
    """Where each row exited: ``exit_index`` [N] (index into the exits), ``layers_run`` [N]
    (``exit_layers[exit_index]``), the exiting exit's ``logits`` [N, C] and ``predictions`` [N]."""

    exit_index: np.ndarray
    layers_run: np.ndarray
    logits: np.ndarray
    predictions: np.ndarray

    def mean_layers(self) -> float:
        """Mean number of layers run per row."""
        return float(np.mean(self.layers_run))


def make_decision(exit_index, logits, exit_layers: Sequence[int]) -> Decision:
    exit_index = np.asarray(exit_index, np.int64)
    logits = np.asarray(logits)
    return Decision(exit_index, np.asarray(exit_layers, np.int64)[exit_index], logits, np.argmax(logits, -1))


def simulate(all_logits, rule, exit_layers: Sequence[int]) -> Decision:
    """Offline early exit: where each row would exit under ``rule``, from the logits of every
    exit [E, N, C] (`efficient_nlp.dynamic.exits.exit_logits`), so a threshold sweep costs one
    forward pass.  ``exit_layers``: the layer count of each exit (``model.exit_layers``)."""
    z = np.asarray(all_logits)
    if z.ndim != 3 or z.shape[0] != len(exit_layers):
        raise ValueError(f"need logits [E, N, C] with E = len(exit_layers) = {len(exit_layers)}, got {z.shape}")
    num_exits, n = z.shape[:2]
    check_rule(rule, num_exits)
    exit_index = np.full(n, num_exits - 1, np.int64)
    done = np.zeros(n, bool)
    state = init_state(rule, n)
    for e in range(num_exits):
        exits, state = decide(rule, z[e], e, state, last=e == num_exits - 1)
        exit_index[exits & ~done] = e
        done |= exits
    return make_decision(exit_index, z[exit_index, np.arange(n)], exit_layers)


__all__ = ["Confidence", "Decision", "Entropy", "Patience", "RULES", "check_rule", "decide", "entropy",
           "fit_temperature", "init_state", "make_decision", "max_prob", "rule_from_dict", "rule_to_dict",
           "simulate"]
