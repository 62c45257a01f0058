"""FLOPs model of a width search space: FLOPs of every candidate architecture, jit-able.

A network's forward FLOPs (2 per multiply-add, matrix products and convolutions only) are a
polynomial of degree <= 2 in the searched widths: a conv or dense layer costs
``coef * c_in * c_out`` where each factor is a searched width or a constant.  `FlopsModel` holds
that polynomial as terms ``(coef, a, b)`` meaning ``coef * w_a * w_b`` (``a``/``b`` a decision
index or None for the constant 1), and evaluates it for architectures given as candidate indices,
on numpy or inside jit, for one architecture ``[D]`` or a batch ``[..., D]``.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlopsModel:
    """``flops(arch) = sum coef * w[a] * w[b]`` with ``w[d] = candidates[d][arch[d]]``.

    ``candidates``: per decision, the candidate widths (ascending; index 0 is the smallest).
    ``terms``: tuples ``(coef, a, b)``; ``a``, ``b`` decision indices or None (factor 1).
    """

    candidates: tuple[tuple[int, ...], ...]
    terms: tuple[tuple[float, int | None, int | None], ...]

    @property
    def num_decisions(self) -> int:
        return len(self.candidates)

    def table(self):
        """``[D, A_max]`` float32 width table (unused entries repeat the last candidate)."""
        a = max(len(c) for c in self.candidates)
        return np.asarray([list(c) + [c[-1]] * (a - len(c)) for c in self.candidates], np.float64)

    def __call__(self, arch):
        """FLOPs of ``arch`` (int indices ``[..., D]``); numpy in -> float, jax in -> jax array."""
        xp = jnp if not isinstance(arch, (np.ndarray, list, tuple)) else np
        arch = xp.asarray(arch)
        table = xp.asarray(self.table(), dtype=xp.float32 if xp is jnp else np.float64)
        widths = table[xp.arange(self.num_decisions), arch]             # [..., D]
        total = xp.zeros(arch.shape[:-1], widths.dtype)
        for coef, a, b in self.terms:
            term = xp.full(arch.shape[:-1], float(coef), widths.dtype)
            if a is not None:
                term = term * widths[..., a]
            if b is not None:
                term = term * widths[..., b]
            total = total + term
        return float(total) if xp is np and total.ndim == 0 else total

    def max_arch(self):
        return np.asarray([len(c) - 1 for c in self.candidates], np.int32)

    def min_arch(self):
        return np.zeros(self.num_decisions, np.int32)

    def max(self) -> float:
        return self(self.max_arch())

    def min(self) -> float:
        return self(self.min_arch())

    def partial(self, arch, num_decided):
        """FLOPs with decisions ``>= num_decided`` at their smallest width (the cheapest
        completion of the prefix): what the controller's remaining-budget input is based on."""
        xp = jnp if not isinstance(arch, (np.ndarray, list, tuple)) else np
        arch = xp.asarray(arch)
        decided = xp.arange(self.num_decisions) < num_decided
        return self(xp.where(decided, arch, 0))

    def widths(self, arch) -> tuple[int, ...]:
        return tuple(int(self.candidates[d][int(a)]) for d, a in enumerate(arch))


def resnet_flops_model(candidates: Sequence[Sequence[int]], *, blocks_per_stage: int,
                       image_size: int, in_channels: int, num_classes: int,
                       kernel_size: int = 3) -> FlopsModel:
    """The FLOPs polynomial of `efficient_nlp.nas.spaces.ApsResNet` (decision order: per stage,
    the stage width then each block's inner width).  Counted: 3x3 convs (stem, two per block),
    1x1 projection shortcuts where the stage changes, the final dense layer.  BatchNorm, ReLU,
    additions and pooling are not counted."""
    k2 = kernel_size * kernel_size
    terms = []
    size = image_size
    stage_dec = []
    d = 0
    for s in range(3):
        stage_dec.append(d)
        d += 1 + blocks_per_stage
    terms.append((2.0 * k2 * size * size * in_channels, stage_dec[0], None))      # stem
    for s in range(3):
        for blk in range(blocks_per_stage):
            inner = stage_dec[s] + 1 + blk
            stride = 2 if (s > 0 and blk == 0) else 1
            prev = stage_dec[s - 1] if (s > 0 and blk == 0) else stage_dec[s]
            size = (size + stride - 1) // stride
            hw = size * size
            terms.append((2.0 * k2 * hw, prev, inner))                 # conv1 (strided)
            terms.append((2.0 * k2 * hw, inner, stage_dec[s]))         # conv2
            if prev != stage_dec[s]:
                terms.append((2.0 * hw, prev, stage_dec[s]))           # 1x1 projection
    terms.append((2.0 * num_classes, stage_dec[2], None))              # classifier
    return FlopsModel(tuple(tuple(int(w) for w in c) for c in candidates), tuple(terms))


def bert_flops_model(candidates: Sequence[Sequence[int]], *, num_layers: int, hidden_size: int,
                     head_dim: int, seq_len: int) -> FlopsModel:
    """FLOPs of an encoder's layers and the ``hidden x hidden`` dense before its classifier
    (BERT's pooler, the other families' ``pre_classifier``) for ONE sequence of ``seq_len``
    tokens, with decisions (per layer: number of heads, FFN width), exactly as
    `efficient_nlp.models.flops.forward_flops` counts (Q/K/V/O projections, attention scores and
    context, the two FFN matrices, that dense)."""
    t, h, d = seq_len, hidden_size, head_dim
    terms = []
    for layer in range(num_layers):
        heads, ffn = 2 * layer, 2 * layer + 1
        terms.append((2.0 * t * h * d * 4, heads, None))   # Q, K, V, O projections
        terms.append((2.0 * t * t * d * 2, heads, None))   # scores and context
        terms.append((2.0 * t * h * 2, ffn, None))         # FFN
    terms.append((2.0 * h * h, None, None))                # dense before the classifier
    return FlopsModel(tuple(tuple(int(w) for w in c) for c in candidates), tuple(terms))


def encoder_flops_model(candidates: Sequence[Sequence[int]], config, *, seq_len: int) -> FlopsModel:
    """`bert_flops_model` with the sizes (layers, hidden size, head width) read from a model
    ``config`` (`efficient_nlp.models.BertConfig`, any encoder family), plus the embedding
    projection when the embedding width differs from the hidden size (ELECTRA): the count of
    `efficient_nlp.models.flops.forward_flops` for the resized config."""
    fm = bert_flops_model(candidates, num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                          head_dim=config.attention_head_dim, seq_len=seq_len)
    e, h = getattr(config, "embedding_width", config.hidden_size), config.hidden_size
    if e == h:
        return fm
    return dataclasses.replace(fm, terms=fm.terms + ((2.0 * seq_len * e * h, None, None),))
