"""The default optimizer: AdamW, linear warmup then linear decay, global-norm clipping.

Weight decay (decoupled, scaled by the learning rate as in PyTorch's AdamW) is applied
to weight matrices only (``weight_decay_mask``): kernels, embedding tables, LoRA / adapter
factors.  It is never applied to

* any leaf of ndim <= 1, biases and normalisation parameters (a path component containing
  ``bias`` / ``norm``; a leaf named ``scale``: flax's name for every norm's gain, e.g. the
  per-candidate batch-norm of a NAS supernet);
* quantizer state: every leaf under a ``weight_quant`` / ``input_quant`` module (numbered in a
  split layer) or the attention's ``matmul_quant`` hook (its ``q`` / ``k`` / ``v`` / ``probs``
  quantizers), and leaves named ``step``, ``offset`` (LSQ / LSQ+), ``lo`` / ``hi`` (PACT clip
  values).  Per-channel LSQ steps are
  ``[1, d_out]`` and group-wise ones ``[d_in / g, 1, d_out]``: decay would pull the grid
  towards zero, which is not a regulariser of the weights but a change of the quantizer;
* other learned controls that are not weights: pruning gates (``head_gates`` / ``ffn_gates``,
  regularised by their own L1 term) and token-skipping ``retention`` / ``threshold`` values.
"""
import math
import re

import jax
import jax.numpy as jnp
import optax

from efficient_nlp.tree import path_str

# A parameter whose path has a component matching this (case-insensitively) is not decayed.
NO_DECAY_PATTERN = re.compile(r"bias|layernorm|layer_norm|norm", re.IGNORECASE)
#: Path components whose whole subtree is not decayed: quantizer modules (``weight_quant1`` /
#: ``weight_quant2``: the halves of a split layer), pruning gates.
NO_DECAY_MODULES = re.compile(r"(weight_quant|input_quant)\d*|matmul_quant|head_gates|ffn_gates")
#: Leaf names that are not decayed: quantizer state, norm gains, token-skipping controls.
NO_DECAY_LEAVES = frozenset({"step", "offset", "lo", "hi", "scale", "retention", "threshold"})


def _cfg(config):
    """The ``train`` section of a config (or the config itself when it is that section)."""
    try:
        return config.train
    except (AttributeError, KeyError):
        return config


def _get(cfg, key, default):
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def warmup_steps(config, num_steps):
    """``ceil(warmup_ratio * num_steps)`` (HF ``get_linear_schedule_with_warmup``)."""
    ratio = float(_get(_cfg(config), "warmup_ratio", 0.0))
    return int(math.ceil(ratio * num_steps))


def make_lr_schedule(config, num_steps):
    """Learning rate after ``count`` completed updates (the one update ``count + 1`` uses).

    Linear from 0 to ``learning_rate`` over the warmup steps, then linear to 0 at
    ``num_steps``: lr(c) = lr * c / w for c < w, else lr * max(0, (N - c) / (N - w)).
    """
    cfg = _cfg(config)
    peak = float(_get(cfg, "learning_rate", 1e-3))
    total = int(num_steps)
    warm = warmup_steps(config, total)

    def schedule(count):
        c = jnp.asarray(count, jnp.float32)
        up = c / max(warm, 1)
        down = jnp.maximum(0.0, (total - c) / max(total - warm, 1))
        return peak * jnp.where(c < warm, up, down)

    return schedule


def decays(path, leaf):
    """True if weight decay applies to the parameter at ``path`` (a weight matrix; see the
    module docstring for what is excluded)."""
    if jnp.ndim(leaf) <= 1:
        return False
    names = path_str(path).split(".")
    if names[-1] in NO_DECAY_LEAVES or any(NO_DECAY_MODULES.fullmatch(name) for name in names[:-1]):
        return False
    return not any(NO_DECAY_PATTERN.search(name) for name in names)


def weight_decay_mask(params):
    """Pytree of bools like ``params``: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, num_steps):
    """AdamW with the warmup/decay schedule, clipping and the weight-decay mask.

    Reads ``config.train`` keys learning_rate, warmup_ratio, weight_decay, grad_clip
    (<= 0 or None: no clipping), adam_b1, adam_b2, adam_eps.
    """
    cfg = _cfg(config)
    schedule = make_lr_schedule(config, num_steps)
    parts = []
    clip = _get(cfg, "grad_clip", 0.0)
    if clip and float(clip) > 0:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.adamw(
        schedule,
        b1=float(_get(cfg, "adam_b1", 0.9)),
        b2=float(_get(cfg, "adam_b2", 0.999)),
        eps=float(_get(cfg, "adam_eps", 1e-8)),
        weight_decay=float(_get(cfg, "weight_decay", 0.0)),
        mask=weight_decay_mask))
    return optax.chain(*parts)
