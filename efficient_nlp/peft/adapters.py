"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

An adapter maps a sub-layer's output ``y [.., d]`` through a small bottleneck and adds it back:

    adapter(y) = y + up(act(down(y)))        down [d, m], up [m, d], m = size << d

Houlsby et al. insert one after the attention output projection and one after the FFN output
projection, before the residual add and layer norm.  Here `AdapterLinear` wraps those two
Linears (roles ``o`` and ``ffn_out``), so it sits right after the projection: before the layer's
hidden dropout, which then drops the adapted output, then the residual add and (post-norm
encoders) the layer norm.  ``down`` starts near zero (N(0, 0.01^2), the paper's near-identity
initialisation) and ``up`` at zero, so the adapted model starts exactly equal to the base.
Adapters are nonlinear: `efficient_nlp.peft.merge` cannot fold them into the weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.models.bert import activation as activation_fn
from efficient_nlp.peft.lora import PeftParam, PeftWrapper, features, find_targets, report

#: Standard deviation of the down-projection's initial weights.
INIT_STD = 1e-2


class AdapterParam(PeftParam):
    """A bottleneck adapter's parameter."""


class AdapterLinear(PeftWrapper):
    """``y = base(x); y + (act(y @ down + down_bias) @ up + up_bias)`` (module docstring).

    ``activation`` is a HF activation name (``gelu``, ``relu``, ``silu`` ...).  The adapter's
    parameters are float32; its output is cast to the base output's dtype.
    """

    kind = "adapter"

    def __init__(self, base, *, size: int, activation: str = "gelu", rngs: nnx.Rngs, site: str = "the base"):
        d_in, d_out = features(base, site)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{site}: adapter size must be an int >= 1, got {size!r}")
        activation_fn(activation)
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.size, self.activation = size, activation
        self.down = AdapterParam(INIT_STD * jax.random.normal(rngs.params(), (d_out, size), jnp.float32))
        self.down_bias = AdapterParam(jnp.zeros((size,), jnp.float32))
        self.up = AdapterParam(jnp.zeros((size, d_out), jnp.float32))
        self.up_bias = AdapterParam(jnp.zeros((d_out,), jnp.float32))

    def __call__(self, x):
        y = self.base(x)
        h = activation_fn(self.activation)(y @ self.down[...] + self.down_bias[...])
        return y + (h @ self.up[...] + self.up_bias[...]).astype(y.dtype)

    def settings(self) -> dict:
        return {"kind": self.kind, "size": self.size, "activation": self.activation,
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def restore(cls, base, settings: dict, tensors: dict, *, rngs: nnx.Rngs, site: str) -> "AdapterLinear":
        """An `AdapterLinear` over ``base`` with ``settings`` (from `settings`) and ``tensors``."""
        module = cls(base, size=int(settings["size"]), activation=settings["activation"], rngs=rngs, site=site)
        module.load_tensors(tensors, site)
        return module


def add_adapters(model, *, size: int = 64, roles=("o", "ffn_out"), rules=None, activation: str = "gelu",
                 seed: int = 0):
    """A copy of ``model`` with an `AdapterLinear` (bottleneck ``size``) after every target
    Linear, and its `efficient_nlp.peft.PeftReport`.  Targets as in `efficient_nlp.peft.add_lora`
    (family ``roles``, by default Houlsby's two sites per layer, and / or ``rules``); errors too,
    plus ValueError for an unknown ``activation`` or a bad ``size``."""
    paths = find_targets(model, roles, rules, what="add_adapters")
    out = train.copy_model(model)
    root = jax.random.key(seed)
    for i, path in enumerate(paths):
        F.set_module(out, path, AdapterLinear(F.get_module(out, path), size=size, activation=activation,
                                              rngs=nnx.Rngs(params=jax.random.fold_in(root, i)), site=path))
    return out, report(out, f"adapters size={size} {activation}", paths)


__all__ = ["AdapterLinear", "AdapterParam", "INIT_STD", "add_adapters"]
