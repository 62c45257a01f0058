"""LoRA: a trainable low-rank update next to a frozen Linear (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

A target Linear ``y = base(x)`` (kernel ``W [d_in, d_out]``) becomes `LoraLinear`:

    y = base(x) + (alpha / r) * dropout(x) @ A @ B        A [d_in, r], B [r, d_out]

``A`` starts random (Kaiming-uniform ``U(-1/sqrt(d_in), 1/sqrt(d_in))``, or Gaussian
``N(0, 1/r^2)``), ``B`` starts at zero, so the wrapped model computes exactly what the base did.
Only ``A`` and ``B`` train (plus the model's head, `trainable`); the base is frozen, whatever it is:
a float ``nnx.Linear``, a fake-quantized ``QuantLinear`` (LoRA on top of QAT), a 4-bit packed base
(QLoRA) or a low-rank factorised Linear.  Targets are chosen by family role (``q`` and ``v`` by
default, as in the paper) and / or by regular expressions over module paths.

`merge` folds ``W + (alpha / r) A @ B`` back into a plain ``nnx.Linear`` (same outputs, no extra
matmul); `efficient_nlp.peft.unmerge` undoes it.

    lora_model, report = peft.add_lora(model, roles=("q", "v"), rank=8, alpha=16.0)
    trained, _ = train.run(lora_model, loss_fn, optax.adamw(1e-3), batches, steps=100,
                           trainable=peft.trainable(lora_model))
    deployed = peft.merge(trained)
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train, tree
from efficient_nlp.lowrank.modules import LowRankLinear
from efficient_nlp.models import family as F
from efficient_nlp.quant.modules import QuantLinear
from efficient_nlp.quant.transform import family_or_none

INITS = ("kaiming", "gaussian")
#: How many target paths a report's ``__str__`` lists before eliding the rest.
_LISTED = 4


class PeftError(ValueError):
    """A parameter-efficient fine-tuning request that cannot be carried out (the message says why
    and what to do instead)."""


class PeftParam(nnx.Param):
    """A parameter added by parameter-efficient fine-tuning (the base of `LoraParam` and
    `efficient_nlp.peft.AdapterParam`); `trainable` selects these."""


class LoraParam(PeftParam):
    """A LoRA factor (``lora_a`` or ``lora_b``)."""


class PeftWrapper(nnx.Module):
    """A module that wraps a Linear-like ``base`` (``in_features``, ``out_features``,
    ``__call__(x)``) and adds trainable parameters.  Subclasses set ``kind`` and implement
    ``settings()`` (JSON-able hyper-parameters), ``tensors()`` and ``restore``."""

    kind = ""

    def tensors(self) -> dict[str, np.ndarray]:
        """The added parameters by attribute name, as host arrays."""
        return {name: np.asarray(jax.device_get(var.get_value()))
                for name, var in vars(self).items() if isinstance(var, PeftParam)}

    def load_tensors(self, tensors: dict, site: str) -> None:
        """Set the added parameters from ``tensors`` (PeftError naming a missing or mis-shaped one)."""
        own = {name: var for name, var in vars(self).items() if isinstance(var, PeftParam)}
        if set(tensors) != set(own):
            raise PeftError(f"{site}: a {self.kind} holds {sorted(own)}, the adapter gives {sorted(tensors)}")
        for name, var in own.items():
            arr = np.asarray(tensors[name])
            if arr.shape != var.get_value().shape:
                raise PeftError(f"{site}.{name}: the model's {self.kind} needs shape {var.get_value().shape}, "
                                f"the adapter holds {arr.shape}")
            var.set_value(jnp.asarray(arr, var.get_value().dtype))


def features(module, site: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear-like module (PeftError otherwise)."""
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not isinstance(d_in, int) or not isinstance(d_out, int) or not callable(module):
        raise PeftError(f"{site} is a {type(module).__name__}, not a Linear-like module (one with in_features, "
                        "out_features and __call__(x)); target Linear sites only")
    return d_in, d_out


def _check_rank(rank, d_in: int, d_out: int, site: str) -> int:
    limit = min(d_in, d_out)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= limit:
        raise ValueError(f"{site}: LoRA rank must be an int in [1, {limit}] (min(d_in={d_in}, d_out={d_out})), "
                         f"got {rank!r}")
    return int(rank)


class LoraLinear(PeftWrapper):
    """``y = base(x) + (alpha / r) * dropout(x) @ lora_a @ lora_b`` (module docstring).

    ``base`` is any Linear-like module (it stays as it is and is not trained by `trainable`);
    ``lora_a [d_in, r]`` starts from ``init``, ``lora_b [r, d_out]`` at zero.  The factors are
    float32 whatever the base computes in; their product is cast to the base output's dtype.

    Dropout: the Linears of `efficient_nlp.models` are called as ``linear(x)``, without the
    call-time ``deterministic`` / ``rngs`` of the layers, so the LoRA branch has its own
    ``nnx.Dropout`` with its own RNG stream (drawn from ``rngs``).  It is active when created;
    ``model.eval()`` turns it off for evaluation and ``model.train()`` back on.
    """

    kind = "lora"

    def __init__(self, base, *, rank: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 rngs: nnx.Rngs, site: str = "the base"):
        d_in, d_out = features(base, site)
        rank = _check_rank(rank, d_in, d_out, site)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{site}: LoRA alpha must be a number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{site}: LoRA dropout must be a number in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"{site}: LoRA init must be one of {INITS}, got {init!r}")
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.rank, self.alpha, self.dropout_rate = rank, float(alpha), float(dropout)
        self.scale = self.alpha / rank
        key = rngs.params()
        if init == "kaiming":
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(key, (d_in, rank), jnp.float32) / rank
        self.lora_a = LoraParam(a)
        self.lora_b = LoraParam(jnp.zeros((rank, d_out), jnp.float32))
        self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate > 0 else None

    def delta(self) -> jax.Array:
        """The update of the kernel, ``(alpha / r) A @ B`` [d_in, d_out] (float32)."""
        return self.scale * (self.lora_a[...] @ self.lora_b[...])

    def __call__(self, x):
        y = self.base(x)
        h = x if self.dropout is None else self.dropout(x)
        update = self.scale * ((h @ self.lora_a[...]) @ self.lora_b[...])
        return y + update.astype(y.dtype)

    def settings(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_rate,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def restore(cls, base, settings: dict, tensors: dict, *, rngs: nnx.Rngs, site: str) -> "LoraLinear":
        """A `LoraLinear` over ``base`` with ``settings`` (from `settings`) and ``tensors``."""
        module = cls(base, rank=int(settings["rank"]), alpha=float(settings["alpha"]),
                     dropout=float(settings.get("dropout", 0.0)), rngs=rngs, site=site)
        module.load_tensors(tensors, site)
        return module


# ----------------------------------------------------------------------------- targets
def linear_paths(model) -> dict[str, object]:
    """``{path: module}`` of the outermost Linear-like modules of ``model`` (those with
    ``in_features`` and ``out_features``; the Linears inside one, e.g. a factorised Linear's two
    factors, are not listed), in graph order."""
    found = {}
    for path, mod in nnx.iter_modules(model):
        name = ".".join(str(p) for p in path)
        if (path and isinstance(getattr(mod, "in_features", None), int)
                and isinstance(getattr(mod, "out_features", None), int)
                and not any(name.startswith(outer + ".") for outer in found)):
            found[name] = mod
    return found


def find_targets(model, roles, rules, *, what: str) -> list[str]:
    """Module paths chosen by family ``roles`` and / or regex ``rules`` over module paths (the
    union, in that order).  An unknown role or one the family lacks: ValueError listing the
    family's roles; a rule matching no Linear-like module: `efficient_nlp.tree.RuleError`
    listing their paths; a target that already holds a LoRA or adapter: `PeftError`."""
    roles = (roles,) if isinstance(roles, str) else tuple(roles or ())
    paths: list[str] = []
    if roles:
        unknown = [r for r in roles if r not in F.LAYER_ROLES]
        if unknown:
            raise ValueError(f"{what}: unknown role(s) {unknown}; layer roles are {F.LAYER_ROLES}")
        fam = family_or_none(model)
        if fam is None:
            raise ValueError(f"{what}: roles need a model family ({type(model).__name__} has none); choose "
                             "targets with rules=[regex over module paths] and roles=()")
        fam.require(*roles, what=what)
        paths += [s.path for s in F.sites(model, roles, unique=True)]
    if rules is not None:
        candidates = linear_paths(model)
        compiled = tree.compile_rules(rules)
        odd = [r for r in compiled if r.payload is not True]
        if odd:
            raise tree.RuleError(f"{what}: rules are plain regexes over module paths; rule {odd[0].index} "
                                 f"{odd[0].regex!r} has the payload {odd[0].payload!r}")
        found = tree.match({p: 0 for p in candidates}, compiled)
        paths += [p for p in candidates if p in found and p not in paths]
    if not paths:
        raise ValueError(f"{what}: no targets; give roles (e.g. ('q', 'v')) and / or rules (regexes over "
                         "module paths)")
    for path in paths:
        module = F.get_module(model, path)
        if isinstance(module, PeftWrapper):
            raise PeftError(f"{path} already holds a {module.kind}; add one LoRA or adapter per site "
                            "(merge the first one, or target other sites)")
        features(module, path)
    return paths


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class Trainable:
    """NNX filter: the PEFT parameters and the parameters under the module paths ``heads``.
    Hashable, so `efficient_nlp.train` reuses a compiled step across equal filters."""

    heads: tuple[str, ...] = ()

    def __call__(self, path, value) -> bool:
        if isinstance(value, PeftParam):
            return True
        if not isinstance(value, nnx.Param) or not self.heads:
            return False
        name = ".".join(str(p) for p in path)
        return any(name.startswith(h + ".") for h in self.heads)


def trainable(model, *, head: bool = True) -> Trainable:
    """The NNX filter of what parameter-efficient fine-tuning trains: every LoRA / adapter
    parameter and, with ``head``, every parameter of the model's head modules
    (`efficient_nlp.models.family.head_paths`: a fresh classifier must learn, as PEFT's
    ``modules_to_save``).  Pass it as ``trainable=`` to `efficient_nlp.train.run` / ``fit``:
    only those variables get gradients and optimizer state.  A causal LM whose pretrained head
    should stay fixed wants ``head=False``."""
    if not head:
        return Trainable()
    if family_or_none(model) is None:
        raise ValueError(f"{type(model).__name__} has no model family, so its head modules are unknown; "
                         "pass head=False (and combine the filter with nnx.Any for a head of your own)")
    return Trainable(tuple(F.head_paths(model)))


@dataclasses.dataclass(frozen=True)
class PeftReport:
    """What `add_lora` / `efficient_nlp.peft.add_adapters` did: the ``method`` with its settings,
    the ``targets`` (module paths), the parameters `trainable` selects (PEFT parameters plus the
    ``head`` modules') and all parameters of the new model."""

    method: str
    targets: tuple[str, ...]
    trainable_params: int
    total_params: int
    head: tuple[str, ...] = ()

    @property
    def fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self):
        shown = ", ".join(self.targets[:_LISTED]) + (f", ... (+{len(self.targets) - _LISTED})"
                                                     if len(self.targets) > _LISTED else "")
        head = f"; with the head {', '.join(self.head)}" if self.head else ""
        return (f"{self.method} at {len(self.targets)} sites: {self.trainable_params:,} trainable of "
                f"{self.total_params:,} params ({100 * self.fraction:.2f}%{head})\n  targets: {shown}")


def report(model, method: str, targets) -> PeftReport:
    """The `PeftReport` of a wrapped ``model``."""
    filt = trainable(model) if family_or_none(model) is not None else Trainable()
    # a packed 4-bit base (efficient_nlp.peft.qlora) holds its weights outside nnx.Param
    packed = sum(m.in_features * m.out_features + (0 if m.bias is None else m.out_features)
                 for _, m in nnx.iter_modules(model) if type(m).__name__ == "PackedLinear")
    return PeftReport(method, tuple(targets), train.count_params(model, filt), train.count_params(model) + packed,
                      filt.heads)


def add_lora(model, *, roles=("q", "v"), rules=None, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             seed: int = 0, init: str = "kaiming"):
    """A copy of ``model`` with a `LoraLinear` at every target and its `PeftReport`.

    Args:
      model: any NNX model; ``roles`` need a model family (`efficient_nlp.models`).
      roles: family roles (``q``, ``k``, ``v``, ``o``, ``ffn_in``, ``ffn_gate``, ``ffn_out``) of
        every layer; ``()`` for none.
      rules: regexes over module paths (`efficient_nlp.tree` rules, e.g.
        ``r"layers\\.1[01]\\.attention\\.(query|value)$"``) adding Linear-like modules anywhere.
      rank, alpha: ``r`` and ``alpha`` of ``W + (alpha / r) A @ B``; ``rank`` at most
        ``min(d_in, d_out)`` of each target.
      dropout: dropout rate on the LoRA branch's input (see `LoraLinear`).
      seed: seeds ``A`` (site ``i`` uses ``fold_in(key(seed), i)``) and the dropout streams.
      init: ``"kaiming"`` (uniform, the default) or ``"gaussian"`` for ``A``.

    Raises:
      ValueError: an unknown role, no targets, or a bad rank / alpha / dropout (naming the site);
      `efficient_nlp.tree.RuleError` for a rule matching no Linear-like module; `PeftError` for a
      target that already holds a LoRA or adapter.
    """
    paths = find_targets(model, roles, rules, what="add_lora")
    out = train.copy_model(model)
    root = jax.random.key(seed)
    for i, path in enumerate(paths):
        rngs = nnx.Rngs(params=jax.random.fold_in(root, i), dropout=jax.random.fold_in(root, 10_000 + i))
        F.set_module(out, path, LoraLinear(F.get_module(out, path), rank=rank, alpha=alpha, dropout=dropout,
                                           init=init, rngs=rngs, site=path))
    return out, report(out, f"LoRA r={rank} alpha={alpha:g}" + (f" dropout={dropout:g}" if dropout else ""), paths)


def wrappers(model) -> dict[str, PeftWrapper]:
    """``{module path: wrapper}`` of every LoRA / adapter module of ``model``."""
    return {".".join(str(p) for p in path): mod for path, mod in nnx.iter_modules(model)
            if isinstance(mod, PeftWrapper)}


def _float_linear(kernel, bias, dtype) -> nnx.Linear:
    """An ``nnx.Linear`` holding ``kernel [d_in, d_out]`` and ``bias`` (or None)."""
    d_in, d_out = kernel.shape
    new = nnx.eval_shape(lambda: nnx.Linear(d_in, d_out, use_bias=bias is not None, dtype=dtype,
                                            param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
    new.kernel.set_value(jnp.asarray(kernel))
    if bias is not None:
        new.bias.set_value(jnp.asarray(bias))
    return new


def _float_base(base, path: str) -> nnx.Linear:
    """The float ``nnx.Linear`` that computes what a quantized ``base`` computes."""
    if isinstance(base, QuantLinear):
        if base.input_quant is not None:
            raise PeftError(f"{path}: the base quantizes its inputs too ({base.input_quant.quantizer.name}), which "
                            "no float Linear does; keep the LoRA separate")
        kernel = base.kernel[...] if base.weight_quant is None else base.weight_quant(base.kernel[...])
    elif callable(getattr(base, "dequantize", None)):
        kernel = base.dequantize()
    else:
        raise PeftError(f"{path}: the LoRA's base is a {type(base).__name__}, which has no float form "
                        "(a dequantize() method); keep the LoRA separate")
    return _float_linear(kernel, None if base.bias is None else base.bias[...], base.dtype)


def dequantize_base(model):
    """A copy of ``model`` in which every LoRA over a quantized base (a weight-only
    ``QuantLinear``, QLoRA's ``PackedLinear``, anything with ``dequantize()``) sits on a float
    ``nnx.Linear`` holding the weight the quantized base computes with: the same outputs (to
    float rounding), in float, so that `merge` can fold the LoRA in afterwards.

    Raises `PeftError` for a base that also quantizes its inputs (no float Linear computes that).
    """
    out = train.copy_model(model)
    for path, mod in wrappers(out).items():
        if isinstance(mod, LoraLinear) and not isinstance(mod.base, (nnx.Linear, LowRankLinear)):
            mod.base = _float_base(mod.base, path)
    return out


def _merged(mod: LoraLinear, path: str):
    """The module computing ``base(x) + (alpha / r) x A B`` with one Linear (PeftError if none)."""
    base = mod.base
    if isinstance(base, nnx.Linear):
        kernel = base.kernel.get_value()
        base.kernel.set_value((kernel.astype(jnp.float32) + mod.delta()).astype(kernel.dtype))
        return base
    if not isinstance(base, LowRankLinear):
        raise PeftError(
            f"{path}: the LoRA's base is a {type(base).__name__}, not a float nnx.Linear; merging would add A @ B to "
            "a kernel that the base rounds to its quantization grid, so the result would not be the trained model. "
            "Keep the LoRA separate, or make the base float first with peft.dequantize_base (same outputs) and "
            "merge that")
    # x D U + s x A B = x [D | A] [U ; s B]: a factorisation of rank r0 + r, exactly.
    rank = base.rank + mod.rank
    if rank > min(mod.in_features, mod.out_features):
        raise PeftError(f"{path}: merging a rank-{mod.rank} LoRA into a rank-{base.rank} factorised Linear gives rank "
                        f"{rank} > min(d_in, d_out) = {min(mod.in_features, mod.out_features)}; keep the LoRA "
                        "separate")
    down, up = base.down.kernel.get_value(), base.up.kernel.get_value()
    return low_rank_linear(jnp.concatenate([down, mod.lora_a[...].astype(down.dtype)], axis=1),
                           jnp.concatenate([up, (mod.scale * mod.lora_b[...]).astype(up.dtype)], axis=0),
                           base.up.bias, base.dtype)


def low_rank_linear(down, up, bias, dtype) -> LowRankLinear:
    """A ``LowRankLinear`` with factors ``down [d_in, r]``, ``up [r, d_out]`` and the ``bias``
    variable's value (or None)."""
    (d_in, rank), d_out = down.shape, up.shape[1]
    new = nnx.eval_shape(lambda: LowRankLinear(d_in, d_out, rank, use_bias=bias is not None, dtype=dtype,
                                               param_dtype=up.dtype, rngs=nnx.Rngs(0)))
    new.down.kernel.set_value(down)
    new.up.kernel.set_value(up)
    if bias is not None:
        new.up.bias.set_value(bias.get_value())
    return new


def merge(model):
    """A copy of ``model`` with every `LoraLinear` folded into its base: a float ``nnx.Linear``
    becomes one with kernel ``W + (alpha / r) A @ B``; a factorised ``LowRankLinear`` ``D U``
    becomes the rank ``r0 + r`` one ``[D | A] [U ; (alpha / r) B]``.  Same outputs up to float32
    rounding (dropout is an identity at inference).

    Raises `PeftError` for a LoRA over a quantized or packed base (its quantizer would re-round
    the sum, so it is not what was trained: `dequantize_base` first) and for bottleneck adapters
    (nonlinear, so nothing can absorb them); ``model`` itself never changes.
    """
    found = wrappers(model)
    for path, mod in found.items():
        if not isinstance(mod, LoraLinear):
            raise PeftError(f"{path} holds a {mod.kind}: a bottleneck adapter is nonlinear (an activation between "
                            "two projections), so it cannot be folded into the weights; keep the model as it is")
    out = train.copy_model(model)
    for path in found:
        F.set_module(out, path, _merged(F.get_module(out, path), path))
    return out


__all__ = ["INITS", "LoraLinear", "LoraParam", "PeftError", "PeftParam", "PeftReport", "PeftWrapper", "Trainable",
           "add_lora", "dequantize_base", "find_targets", "linear_paths", "low_rank_linear", "merge",
           "trainable", "wrappers"]
