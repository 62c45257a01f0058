"""Early exit with real stopping: layers are run only for the rows still undecided.

`EarlyExitRunner` splits a model with exits (`efficient_nlp.dynamic.exits.add_exits`) once
and compiles one function per exit segment (the layers between two exits and the exit's head;
the first also embeds).  After each exit the host applies the rule
(`efficient_nlp.dynamic.exit_rules.decide`, the same code `simulate` runs offline), writes
the rows that exit into their original positions, and gathers the remaining rows (hidden
states, attention mask, the rule's per-row state) into the smallest batch bucket
(`efficient_nlp.dynamic.buckets.batch_buckets`) that holds them, padding with copies of a
remaining row whose results are discarded.  The loop stops when no row remains.

A single row (batch 1) runs as one executable instead (``device_loop``, the default): a
``lax.while_loop`` over the segments applies the same rule on the device after each exit and
stops there, so the layers after the exit never run and no executable launch or host round trip
happens between segments (on XLA:CPU each launch costs ~0.3-0.5 ms, a third of a MiniLM layer
at batch 1).

    runner = EarlyExitRunner(model, exit_rules.Entropy(0.3), max_batch=32)
    runner.warmup(batch)                 # compile every (segment, bucket) pair before timing
    decision = runner(batch)             # exit_index, layers_run, logits, predictions per row

Each segment's function receives only the parameters that segment reads
(`efficient_nlp.dynamic.segments`), so the per-call cost of a segment does not grow with the
model's size; runners of one model share the compiled segments, and ``runner.rule`` can be set
to sweep thresholds.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.dynamic import buckets, exit_rules, exits
from efficient_nlp.dynamic.segments import compile_segments
from efficient_nlp.models import family as F


@jax.jit
def _gather(hidden, mask, idx):
    return hidden[idx], mask[idx]


def _segment_body(model, s: int, inputs):
    """Exit segment ``s``: (embed,) layers ``exit_layers[s-1] .. exit_layers[s]-1`` and exit
    ``s``'s head -> ``(hidden or None for the last segment, logits)``."""
    exit_layers = model.exit_layers
    start = 0 if s == 0 else exit_layers[s - 1]
    if s == 0:
        ids, types, mask = inputs
        hidden = F.embed(model, {"input_ids": ids, "token_type_ids": types})
    else:
        hidden, mask = inputs
    hidden, _ = F.run_layers(model, hidden, mask, start=start, stop=exit_layers[s])
    if s < len(model.exits):
        return hidden, model.exits[s](hidden, mask)
    return None, F.head(model, hidden)


@dataclasses.dataclass(frozen=True)
class _DeviceLoop:
    """Early exit of a single row in one executable: a ``lax.while_loop`` over the exit segments
    (``lax.switch`` picks the segment) that applies ``rule`` on the device after each exit and
    stops when it says so, so the later layers never run and no host round trip or executable
    launch happens between segments.  Returns ``(exit index [n], logits [n, C])``."""

    rule: object

    def __call__(self, model, s, inputs):
        ids, types, mask = inputs
        exit_layers = model.exit_layers
        count = len(exit_layers)
        hidden = F.embed(model, {"input_ids": ids, "token_type_ids": types})

        def branch(k):
            def run(h):
                start = 0 if k == 0 else exit_layers[k - 1]
                h, _ = F.run_layers(model, h, mask, start=start, stop=exit_layers[k])
                z = model.exits[k](h, mask) if k < len(model.exits) else F.head(model, h)
                return h, z.astype(jnp.float32)
            return run

        branches = [branch(k) for k in range(count)]
        n, c = ids.shape[0], int(model.config.num_labels)

        def cond(carry):
            return (carry[0] < count) & ~jnp.all(carry[3])

        def body(carry):
            k, h, out, done, where, state = carry
            h, z = jax.lax.switch(k, branches, h)
            exits, state = exit_rules.decide(self.rule, z, k, state, last=k == count - 1)
            new = exits & ~done
            return (k + 1, h, jnp.where(new[:, None], z, out), done | exits, jnp.where(new, k, where), state)

        init = (jnp.int32(0), hidden, jnp.zeros((n, c), jnp.float32), jnp.zeros(n, bool), jnp.zeros(n, jnp.int32),
                exit_rules.init_state(self.rule, n, xp=jnp))
        _, _, out, _, where, _ = jax.lax.while_loop(cond, body, init)
        return where, out


def _chain(out_shape, first_inputs):
    """The next segment's inputs: the hidden state and the attention mask."""
    return (out_shape[0], first_inputs[2])


class EarlyExitRunner:
    """Early-exit inference with real stopping (module doc).

    Args:
      model: a model with exits (`efficient_nlp.dynamic.exits.add_exits` / ``exits.load``), any
        encoder family, float or quantized; run in eval mode.
      rule: an exit rule (`exit_rules.Entropy`, ``Confidence`` or ``Patience``).
      max_batch: the largest batch run at once (larger inputs are split into chunks); batches
        are padded to `buckets.batch_buckets(max_batch)`.
      device_loop: run single rows as one executable that decides on the device (module doc);
        False: the host loop, as for batches.

    ``runner(batch)`` takes a dict of NumPy arrays (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``: zeros when absent, as the models assume) and returns an
    `exit_rules.Decision` in the input's row order; ``layers_run`` is the number of layers run
    for each row.
    """

    def __init__(self, model, rule, *, max_batch: int = 32, device_loop: bool = True):
        self.exit_layers = exits.require_exits(model)
        self._model = model
        self.device_loop = device_loop
        self.rule = rule
        self.buckets = buckets.batch_buckets(max_batch)
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        self._segments = compile_segments(model, _segment_body, len(self.exit_layers), (ids, ids, ids), _chain)

    @property
    def rule(self):
        """The exit rule; set another one to reuse the compiled segments (a threshold sweep)."""
        return self._rule

    @rule.setter
    def rule(self, rule):
        exit_rules.check_rule(rule, len(self.exit_layers))
        self._rule = rule
        ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
        self._loop = (compile_segments(self._model, _DeviceLoop(rule), 1, (ids, ids, ids), _chain)[0]
                      if self.device_loop else None)

    def _inputs(self, batch: Mapping, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(batch["input_ids"], np.int32)[rows]
        mask = batch.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)[rows]
        types = batch.get("token_type_ids")
        types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)[rows]
        return ids, types, mask

    def _run_chunk(self, ids, types, mask):
        n = ids.shape[0]
        if n == 1 and self._loop is not None:
            where, logits = self._loop(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
            return np.asarray(where, np.int64), np.asarray(logits)
        size = buckets.bucket(n, self.buckets)
        pad = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])
        mask_d = jnp.asarray(mask[pad])
        rows = np.arange(n)  # original row of each live position
        state = exit_rules.init_state(self.rule, n)
        exit_index = np.empty(n, np.int64)
        logits_out = None
        hidden = None
        last = len(self._segments) - 1
        for s, segment in enumerate(self._segments):
            if s == 0:
                hidden, logits = segment(jnp.asarray(ids[pad]), jnp.asarray(types[pad]), mask_d)
            else:
                hidden, logits = segment(hidden, mask_d)
            z = np.asarray(logits)[:len(rows)]
            if logits_out is None:
                logits_out = np.empty((n, z.shape[-1]), z.dtype)
            done, state = exit_rules.decide(self.rule, z, s, state, last=s == last)
            exit_index[rows[done]] = s
            logits_out[rows[done]] = z[done]
            if done.all():
                break
            if done.any():
                keep = np.flatnonzero(~done)
                rows = rows[keep]
                state = {k: v[keep] for k, v in state.items()}
                size = buckets.bucket(len(keep), self.buckets)
                idx = np.concatenate([keep, np.full(size - len(keep), keep[0])]).astype(np.int32)
                hidden, mask_d = _gather(hidden, mask_d, jnp.asarray(idx))
        return exit_index, logits_out

    def __call__(self, batch: Mapping) -> exit_rules.Decision:
        n = int(np.shape(batch["input_ids"])[0])
        if n == 0:
            raise ValueError("the batch has no rows")
        chunk = self.buckets[-1]
        parts = [self._run_chunk(*self._inputs(batch, np.arange(lo, min(lo + chunk, n))))
                 for lo in range(0, n, chunk)]
        exit_index = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
        return exit_rules.make_decision(exit_index, logits, self.exit_layers)

    def warmup(self, batch_like: Mapping) -> None:
        """Compile every (segment, bucket) pair and every compaction for the sequence length of
        ``batch_like`` (its first row is repeated), so timed calls compile nothing."""
        ids, types, mask = self._inputs(batch_like, np.zeros(1, np.int64))
        hidden_by_size = {}
        for size in self.buckets:
            rep = np.zeros(size, np.int64)
            mask_d = jnp.asarray(mask[rep])
            hidden, _ = self._segments[0](jnp.asarray(ids[rep]), jnp.asarray(types[rep]), mask_d)
            hidden_by_size[size] = (hidden, mask_d)
            jax.block_until_ready([segment(hidden, mask_d) for segment in self._segments[1:]])
        for size, (hidden, mask_d) in hidden_by_size.items():
            for smaller in self.buckets:
                if smaller <= size:
                    jax.block_until_ready(_gather(hidden, mask_d, jnp.zeros(smaller, jnp.int32)))


__all__ = ["EarlyExitRunner"]
