"""Masked language modelling (BERT's pre-training objective): masking, loss, train and eval functions.

    settings = dict(vocab_size=len(tok), mask_id=tok.mask_token_id, special_ids=special_ids(tok))
    loss_fn = mlm_loss_fn(**settings)                         # for efficient_nlp.train.fit / run
    eval_fn = mlm_eval_fn(val_blocks, 64, **settings)         # held-out loss / accuracy / perplexity
    model, history = train.fit(model, loss_fn, batches, config=config, workdir=workdir, eval_fn=eval_fn)

Masking (Devlin et al., 2019, section 3.1 and appendix A.1): every eligible token (a real token,
attention mask 1, that is not a special token) is selected independently with probability
``rate`` (0.15). A selected token is replaced by ``[MASK]`` with probability ``mask_prob``
(0.8), by a token drawn uniformly from the non-special vocabulary with probability
``random_prob`` (0.1), and kept unchanged otherwise (0.1). The model sees the corrupted
sequence and is trained to predict the original token at every selected position:

    L = -(1 / |S|) * sum_{(b, t) in S} log softmax(z[b, t])[x[b, t]],

with logits ``z`` of the corrupted input, original tokens ``x`` and selected positions ``S``
(``L = 0`` when ``S`` is empty). The masking is drawn afresh for every training step, from a
key that is a function of the seed and the step (dynamic masking, RoBERTa: Liu et al., 2019),
so a resumed run repeats exactly the masks of an uninterrupted one.

The head computes logits at every position, although only the selected ones (about 15%) enter
the loss: computing them at the selected positions only needs a static number of positions,
and the number selected is random, so a fixed cap would either drop targets or pay for
padding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["mask_tokens", "mlm_loss", "mlm_loss_fn", "mlm_eval_fn"]


# ----------------------------------------------------------------------------- settings
def _probability(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Python number in [0, 1], got {type(value).__name__}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _excluded(vocab_size, mask_id, special_ids) -> tuple[int, tuple[int, ...]]:
    """``(vocab_size, sorted ids never selected nor drawn)``: the special ids and ``mask_id``."""
    vocab_size, mask_id = int(vocab_size), int(mask_id)
    if isinstance(special_ids, (int, np.integer)):
        special_ids = (special_ids,)
    ids = {int(i) for i in special_ids} | {mask_id}
    bad = sorted(i for i in ids if not 0 <= i < vocab_size)
    if bad:
        raise ValueError(f"special ids / mask_id {bad} lie outside the vocabulary [0, {vocab_size}): "
                         "pass the model's vocab_size and the tokenizer's ids (special_ids(tokenizer))")
    if len(ids) >= vocab_size:
        raise ValueError(f"every id of the vocabulary (size {vocab_size}) is special: nothing to mask or draw")
    return vocab_size, tuple(sorted(ids))


def _settings(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob) -> dict:
    vocab_size, excluded = _excluded(vocab_size, mask_id, special_ids)
    mask_prob, random_prob = _probability(mask_prob, "mask_prob"), _probability(random_prob, "random_prob")
    if mask_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(f"mask_prob + random_prob must be <= 1 (the rest stays unchanged), got "
                         f"{mask_prob} + {random_prob}")
    return dict(vocab_size=vocab_size, mask_id=int(mask_id), special_ids=excluded,
                rate=_probability(rate, "rate"), mask_prob=mask_prob, random_prob=random_prob)


# ----------------------------------------------------------------------------- masking
def _draw_non_special(key, shape, vocab_size: int, excluded: tuple[int, ...]):
    """Ids uniform over ``[0, vocab_size)`` minus ``excluded`` (sorted): draw ``r`` uniform in
    ``[0, vocab_size - len(excluded))``, then step over each excluded id at or below it, in
    increasing order, so ``r`` lands on the r-th allowed id."""
    ids = jax.random.randint(key, shape, 0, vocab_size - len(excluded), dtype=jnp.int32)
    for s in excluded:
        ids = ids + (ids >= s).astype(jnp.int32)
    return ids


def mask_tokens(key, input_ids, *, vocab_size, mask_id, special_ids, attention_mask=None, rate=0.15,
                mask_prob=0.8, random_prob=0.1):
    """BERT's corruption of ``input_ids`` (module doc): ``(corrupted_ids int32, selected bool)``.

    Args:
      key: a JAX PRNG key; the same key gives the same corruption.
      input_ids: integer token ids, e.g. ``[B, T]`` (any shape).
      vocab_size: random replacements are drawn from ``[0, vocab_size)`` without the special ids.
      mask_id: the ``[MASK]`` id; it is never selected nor drawn as a random replacement.
      special_ids: ids never selected nor drawn (``special_ids(tokenizer)``); static Python ints.
      attention_mask: same shape as ``input_ids``; positions where it is 0 are never selected.
      rate: probability that an eligible token is selected.
      mask_prob, random_prob: of the selected tokens, the probabilities of ``[MASK]`` and of a
        random token; the rest keep their token.

    Every selection is an independent Bernoulli draw, so a sequence may have no selected token.
    Pure JAX with static shapes: jit-able with the keyword arguments static (closed over, as
    `mlm_loss_fn` does).
    """
    s = _settings(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob)
    input_ids = jnp.asarray(input_ids)
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.astype(jnp.int32)
    shape = input_ids.shape
    eligible = ~jnp.isin(input_ids, jnp.asarray(s["special_ids"], jnp.int32))
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids {shape}: they must match")
        eligible = eligible & (attention_mask > 0)
    k_select, k_action, k_random = jax.random.split(key, 3)
    selected = eligible & jax.random.bernoulli(k_select, s["rate"], shape)
    u = jax.random.uniform(k_action, shape)
    to_mask = selected & (u < s["mask_prob"])
    to_random = selected & (u >= s["mask_prob"]) & (u < s["mask_prob"] + s["random_prob"])
    random_ids = _draw_non_special(k_random, shape, s["vocab_size"], s["special_ids"])
    corrupted = jnp.where(to_mask, jnp.int32(s["mask_id"]), jnp.where(to_random, random_ids, input_ids))
    return corrupted, selected


# ----------------------------------------------------------------------------- loss
def _selected_sums(logits, input_ids, selected):
    """(sum of NLL, number of argmax hits, number selected) over the selected positions, float32."""
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    selected = jnp.asarray(selected, bool)
    hits = (jnp.argmax(logp, axis=-1) == ids) & selected
    return (jnp.sum(jnp.where(selected, nll, 0.0)), jnp.sum(hits.astype(jnp.float32)),
            jnp.sum(selected.astype(jnp.float32)))


def mlm_loss(logits, input_ids, selected):
    """Masked-LM cross-entropy: ``(loss, accuracy)`` over the ``selected`` positions.

    ``logits`` ``[B, T, V]`` (of the corrupted input), ``input_ids`` ``[B, T]`` the original
    tokens, ``selected`` ``[B, T]`` bool. ``loss`` is the mean over selected positions of
    ``-log_softmax(logits)[original]`` (log-softmax in float32), ``accuracy`` the fraction of
    them whose argmax is the original token; both are 0 when nothing is selected.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != jnp.ndim(input_ids) + 1 or logits.shape[:-1] != jnp.shape(input_ids):
        raise ValueError(f"logits shape {logits.shape} does not match input_ids {jnp.shape(input_ids)} + (vocab,)")
    if jnp.shape(selected) != jnp.shape(input_ids):
        raise ValueError(f"selected has shape {jnp.shape(selected)}, input_ids {jnp.shape(input_ids)}: they must match")
    nll, hits, count = _selected_sums(logits, input_ids, selected)
    denominator = jnp.maximum(count, 1.0)
    return nll / denominator, hits / denominator


def mlm_loss_fn(*, vocab_size, mask_id, special_ids, rate=0.15, mask_prob=0.8, random_prob=0.1):
    """``loss_fn(model, batch, rngs) -> (loss, {"mlm_accuracy"})`` for `efficient_nlp.train.fit`.

    The masking key is the first draw of ``rngs.dropout`` (``fit`` builds ``rngs`` from the seed
    and the step, so every step has its own masks and a resumed run the same ones); the batch
    ``{"input_ids", "attention_mask"}`` is corrupted with `mask_tokens` and the model, any
    masked-LM encoder (``BertForMaskedLM`` of any family), runs in training mode on it:
    ``model(corrupted, attention_mask, deterministic=False, rngs=rngs).logits``. The loss is
    `mlm_loss` against the original ids.
    """
    settings = _settings(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob)

    def loss_fn(model, batch, rngs):
        ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        corrupted, selected = mask_tokens(rngs.dropout(), ids, attention_mask=attention_mask, **settings)
        logits = model(corrupted, attention_mask, deterministic=False, rngs=rngs).logits
        loss, accuracy = mlm_loss(logits, ids, selected)
        return loss, {"mlm_accuracy": accuracy}

    return loss_fn


# ----------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnums=(0, 6))
def _eval_sums(graphdef, state, ids, rows, valid, key, settings):
    """NLL sum, hits and selected count of one batch; row ``i`` of the data is masked with the
    key ``fold_in(key, i)``, so the masks do not depend on the batch size or the call."""
    def corrupt(row, x):
        return mask_tokens(jax.random.fold_in(key, row), x, **dict(settings))

    corrupted, selected = jax.vmap(corrupt)(rows, ids)
    selected = selected & valid[:, None]
    mask = jnp.ones_like(ids)
    logits = nnx.merge(graphdef, state)(corrupted, mask).logits
    return _selected_sums(logits, ids, selected)


def mlm_eval_fn(blocks, batch_size, *, vocab_size, mask_id, special_ids, seed=0, rate=0.15, mask_prob=0.8,
                random_prob=0.1):
    """``eval_fn(model) -> {"mlm_loss", "mlm_accuracy", "mlm_perplexity"}`` on held-out blocks.

    ``blocks`` int32 ``[N, T]`` (e.g. from `efficient_nlp.pretrain.data.encoder_blocks`, no
    padding) are corrupted with `mask_tokens`, block ``i`` always with the key
    ``fold_in(key(seed), i)``: every call (and every batch size) scores the same masks, so
    numbers from different evaluations compare. The model runs in evaluation mode (no
    dropout), one jitted forward pass per batch of ``batch_size`` blocks (the last batch is
    filled with unscored rows). ``mlm_loss`` is the mean NLL over all selected tokens of the
    set (summed in float64), ``mlm_accuracy`` the fraction predicted by the argmax and
    ``mlm_perplexity`` ``exp(mlm_loss)``.
    """
    from efficient_nlp import train as train_lib
    from efficient_nlp.train.evaluate import placed_state

    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer) or blocks.shape[0] < 1:
        raise ValueError(f"blocks must be a non-empty integer array [N, block_size], got {blocks.dtype} "
                         f"{blocks.shape}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    blocks = blocks.astype(np.int32)
    settings = tuple(sorted(_settings(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob).items()))
    key = jax.random.key(int(seed))
    n, t = blocks.shape

    def eval_fn(model):
        graphdef, state = placed_state(model, train_lib.make_mesh())
        nll, hits, count = 0.0, 0.0, 0.0
        for start in range(0, n, batch_size):
            rows = np.arange(start, start + batch_size, dtype=np.int32)
            ids = np.zeros((batch_size, t), np.int32)
            real = min(batch_size, n - start)
            ids[:real] = blocks[start:start + real]
            sums = _eval_sums(graphdef, state, ids, rows, rows < n, key, settings)
            nll, hits, count = (a + float(b) for a, b in zip((nll, hits, count), sums))
        if count == 0:
            raise ValueError(f"no token of the {n} held-out blocks was selected for masking (rate "
                             f"{dict(settings)['rate']}): use more held-out text or a larger rate")
        loss = nll / count
        return {"mlm_loss": loss, "mlm_accuracy": hits / count, "mlm_perplexity": math.exp(loss)}

    return eval_fn
