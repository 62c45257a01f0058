"""Token skipping that physically removes tokens (PoWER-BERT, Goyal et al., ICML 2020; LTP, Kim
et al., KDD 2022): later layers run on shorter sequences.

`TokenSkipRunner` runs one jitted function per layer (`efficient_nlp.dynamic.segments`: each
receives only its own parameters) per length bucket (`efficient_nlp.dynamic.buckets.length_buckets`).  A
call:

1. trims the input to the bucket of the longest real row (the first layer does not run on the
   padded length);
2. runs layer j with `efficient_nlp.dynamic.tokens.hard_layer`: the layer, then the keep mask
   from its significance, on device in the same jitted function;
3. reads the largest kept count over the rows on the host, picks its length bucket and, when it
   is shorter than the current length, gathers every row's kept tokens, in their original order,
   into it (hidden states and attention mask; a row with fewer kept tokens gets masked slots);
   otherwise removed tokens stay in place as masked slots;
4. after the last layer, the head reads the first token (always kept, so always at position 0).

It computes the function of `efficient_nlp.dynamic.tokens.hard_forward` (removal instead of
masking changes only the order of float sums).
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.dynamic import buckets as B
from efficient_nlp.dynamic import tokens
from efficient_nlp.dynamic.segments import compile_segments
from efficient_nlp.models import family as F


def _layer_body(model, layer, inputs):
    """Layer ``layer`` (the first also embeds) and the keep mask after it; the last also runs
    the head -> ``(hidden, alive, kept count [B], logits or None)``."""
    if layer == 0:
        ids, types, alive = inputs
        hidden = F.embed(model, {"input_ids": ids, "token_type_ids": types})
    else:
        hidden, alive = inputs
    hidden, alive, count = tokens.hard_layer(model, model.token_skip, layer, hidden, alive)
    logits = F.head(model, hidden) if layer == F.num_layers(model) - 1 else None
    return hidden, alive, count, logits


def _chain(out_shape, first_inputs):
    """The next layer's inputs: the hidden state and the alive mask."""
    return (out_shape[0], out_shape[1])


@functools.partial(jax.jit, static_argnums=(2,))
def _compact(hidden, alive, length):
    """Each row's kept tokens (alive, and the first position), in order, into ``length`` slots."""
    keep = alive | (jnp.arange(alive.shape[-1]) == 0)
    index = jnp.argsort(~keep, axis=-1, stable=True)[:, :length]
    return (jnp.take_along_axis(hidden, index[..., None], axis=1),
            jnp.take_along_axis(alive, index, axis=1))


class TokenSkipRunner:
    """Token-skipping inference that removes tokens (see the module docstring).

    Args:
      model: an encoder classifier with ``token_skip`` (`efficient_nlp.dynamic.tokens.add_token_skip`);
        PoWER models need their counts (`tokens.fix_retention` / `tokens.set_counts`).
      length_step: spacing of the length buckets (each layer compiles once per bucket and batch size).

    ``runner(batch)`` with a dict of numpy arrays (``input_ids``, ``attention_mask``,
    ``token_type_ids``) returns ``(logits [B,C], kept_counts [B,L])`` as numpy, equal to
    `tokens.hard_forward`'s.
    """

    def __init__(self, model, *, length_step: int = 8):
        tokens.check_model(model)
        skip = tokens.token_skip_of(model)
        tokens.require_schedule(skip)
        if int(length_step) < 1:
            raise ValueError(f"length_step must be >= 1, got {length_step}")
        self.length_step = int(length_step)
        self.num_layers = F.num_layers(model)
        self.method = skip.method
        self.max_len = skip.max_len
        ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        self._layers = compile_segments(model, _layer_body, self.num_layers,
                                        (ids, ids, jax.ShapeDtypeStruct((1, 8), jnp.bool_)), _chain)

    def _buckets(self, seq_len: int) -> tuple[int, ...]:
        return B.length_buckets(seq_len, self.length_step)

    def __call__(self, batch: Mapping):
        ids = np.asarray(batch["input_ids"], np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {ids.shape}")
        b, t = ids.shape
        if self.method == "power" and t > self.max_len:
            raise ValueError(f"batch length {t} exceeds the token_skip's max_len={self.max_len}")
        mask = batch.get("attention_mask")
        mask = np.ones((b, t), np.int32) if mask is None else np.asarray(mask, np.int32)
        types = batch.get("token_type_ids")
        types = np.zeros((b, t), np.int32) if types is None else np.asarray(types, np.int32)
        sizes = self._buckets(t)
        real = mask > 0
        longest = int(np.max(np.where(real.any(-1), t - np.argmax(real[:, ::-1], axis=-1), 1)))
        length = B.bucket(longest, sizes)
        hidden, alive, count, logits = self._layers[0](ids[:, :length], types[:, :length], real[:, :length])
        counts = [np.asarray(count)]
        for j in range(1, self.num_layers):
            need = B.bucket(max(int(counts[-1].max()), 1), sizes)
            if need < length:
                hidden, alive = _compact(hidden, alive, need)
                length = need
            hidden, alive, count, logits = self._layers[j](hidden, alive)
            counts.append(np.asarray(count))
        return np.asarray(logits), np.stack(counts, axis=-1)

    def warmup(self, batch_size: int, seq_len: int) -> None:
        """Compile every (layer, length bucket) and every gather for batches of ``batch_size`` rows
        padded to ``seq_len`` (otherwise each compiles on first use)."""
        sizes = self._buckets(seq_len)
        for length in sizes:
            zeros = np.zeros((batch_size, length), np.int32)
            alive = np.ones((batch_size, length), bool)
            hidden, alive, _, _ = self._layers[0](zeros, zeros, alive)
            for j in range(1, self.num_layers):
                self._layers[j](hidden, alive)
            for shorter in sizes[:sizes.index(length)]:
                _compact(hidden, alive, shorter)
        jax.block_until_ready(hidden)


__all__ = ["TokenSkipRunner"]
