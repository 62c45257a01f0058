"""Text generation with the decoder models: greedy decoding and sampling over a key/value cache.

    tokens = generate(model, input_ids, attention_mask, max_new_tokens=32)            # greedy
    tokens = generate(model, input_ids, attention_mask, max_new_tokens=32, do_sample=True,
                      temperature=0.7, top_p=0.9, seed=1)

``tokens`` is ``[B, T + max_new_tokens]``: the prompt, then the new tokens.  Prompts of a batch
are left-padded (``attention_mask`` 0 on the left), so that every row's next token goes to the
same cache slot.  Row ``b`` with ``n_b`` prompt tokens has positions ``0 .. n_b - 1`` (the
cumulative sum of its mask, minus one; padded slots get position 0 and are never attended to),
and its ``i``-th new token position ``n_b + i``: the convention of transformers' ``generate``,
so greedy results match it.

Two jitted functions do the work, both on a `KVCache` of ``max_len = T + max_new_tokens``
slots: the prefill runs the prompt (one compilation per batch size, prompt length and
``max_new_tokens``) and picks the first token; the decode loop (``lax.while_loop``) feeds one
token per step at slot ``T + i - 1`` and picks the next.  Its shapes never change, so it
compiles once, whatever the number of tokens; it stops when every row has produced an
end-of-sequence id, and the rest of a finished row is padding.

Token choice (`sample_logits`): greedy takes the arg-max; sampling divides the logits by the
temperature, keeps the ``top_k`` largest (Fan et al. 2018), then the smallest set of the most
probable tokens whose probability mass reaches ``top_p`` (nucleus sampling, Holtzman et al.
2020; at least one token), and draws from the renormalised softmax of what is left.
"""
from __future__ import annotations

import functools
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.models.decoder import DecoderForCausalLM, KVCache


class Sampling(NamedTuple):
    """How the next token is chosen (hashable: a static argument of the jitted functions)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


# ----------------------------------------------------------------------------- choosing tokens
def _sample(logits, key, temperature, top_k, top_p):
    logits = logits.astype(jnp.float32)
    if top_k is None and top_p is None:
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
    k = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
    values, indices = jax.lax.top_k(logits, k)  # sorted, largest first
    values = values / temperature
    if top_p is not None:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)  # the first is always kept
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_k", "top_p"))
def sample_logits(logits, key, temperature=1.0, top_k: int | None = None, top_p: float | None = None):
    """Draw one token per row of ``logits`` [..., V] -> int32 [...].

    The distribution is ``softmax(logits / temperature)`` restricted to the ``top_k`` most
    probable tokens (None: all) and then to the smallest set of the most probable ones whose
    mass reaches ``top_p`` (None: all; always at least one token), renormalised."""
    return _sample(logits, key, temperature, top_k, top_p)


def _choose(logits, key, sampling: Sampling):
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _sample(logits, key, sampling.temperature, sampling.top_k, sampling.top_p)


def _finish(token, done, eos, pad):
    """Finished rows emit ``pad``; a row is finished once it has emitted an eos id."""
    token = jnp.where(done, jnp.int32(pad), token)
    if eos:
        done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
    return token, done


def _last_logits(model, out):
    """Logits [B, V] of the last position (only that position goes through the LM head)."""
    head = getattr(model, "_logits", None)
    if head is None:
        return out.logits[:, -1].astype(jnp.float32)
    return head(out.last_hidden_state[:, -1:])[:, 0].astype(jnp.float32)


# ----------------------------------------------------------------------------- the jitted parts
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "cache_dtype", "sampling", "eos", "pad"))
def _prefill(graphdef, state, input_ids, slot_mask, position_ids, key, *, max_len, cache_dtype, sampling, eos,
             pad):
    """Run the prompt into an empty cache -> (first token [B], done [B], cache, its logits [B, V])."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.empty(model.config, input_ids.shape[0], max_len, cache_dtype)
    out = model(input_ids, slot_mask, position_ids=position_ids, cache=cache)
    logits = _last_logits(model, out)
    token = _choose(logits, jax.random.fold_in(key, 0), sampling)
    token, done = _finish(token, jnp.zeros(token.shape, bool), eos, pad)
    return token, done, out.cache, logits


@functools.partial(jax.jit, static_argnames=("graphdef", "num_new", "sampling", "eos", "pad", "keep_logits"))
def _decode(graphdef, state, cache, token, done, slot_mask, next_position, key, first_logits, *, num_new,
            sampling, eos, pad, keep_logits):
    """Tokens ``1 .. num_new - 1`` one step at a time -> (new tokens [B, num_new], logits
    [B, num_new, V] or None).  Step ``i`` feeds token ``i - 1`` at position ``next_position + i - 1``."""
    model = nnx.merge(graphdef, state)
    batch = token.shape[0]
    tokens = jnp.full((batch, num_new), pad, jnp.int32).at[:, 0].set(token)
    logits_all = None
    if keep_logits:
        logits_all = jnp.zeros((batch, num_new, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < num_new) & ~jnp.all(done)

    def step(carry):
        i, cache, token, done, tokens, logits_all = carry
        positions = (next_position + i - 1)[:, None]
        out = model(token[:, None], slot_mask, position_ids=positions, cache=cache)
        logits = out.logits[:, 0].astype(jnp.float32)
        token, done = _finish(_choose(logits, jax.random.fold_in(key, i), sampling), done, eos, pad)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        if logits_all is not None:
            logits_all = jax.lax.dynamic_update_slice(logits_all, logits[:, None], (0, i, 0))
        return i + 1, out.cache, token, done, tokens, logits_all

    carry = (jnp.int32(1), cache, token, done, tokens, logits_all)
    _, _, _, _, tokens, logits_all = jax.lax.while_loop(cond, step, carry)
    return tokens, logits_all


# ----------------------------------------------------------------------------- checks and set-up
class _Plan(NamedTuple):
    graphdef: object
    state: object
    input_ids: jax.Array
    slot_mask: jax.Array
    position_ids: jax.Array
    next_position: jax.Array
    key: jax.Array
    max_len: int
    num_new: int
    cache_dtype: object
    sampling: Sampling
    eos: tuple
    pad: int


def _cache_dtype(model) -> np.dtype:
    emb = model.backbone.embeddings.word_embeddings
    dtype = getattr(emb, "dtype", None) or getattr(getattr(emb, "embedding", None), "dtype", None)
    return np.dtype(dtype or np.float32)


def _ids(value, name) -> tuple[int, ...]:
    if value is None:
        return ()
    values = (value,) if np.isscalar(value) else tuple(value)
    for v in values:
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a token id (int >= 0) or a list of them, got {value!r}")
    return tuple(int(v) for v in values)


def _plan(model, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p, seed,
          eos_token_id, pad_token_id) -> _Plan:
    if not isinstance(model, DecoderForCausalLM):
        raise TypeError(f"generate needs a decoder language model (DecoderForCausalLM), got {type(model).__name__}")
    config = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1] (the probability mass to keep), got {top_p!r}")
    if do_sample and not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}; for the most probable "
                         "token use do_sample=False (greedy)")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be int token ids of shape [batch, prompt_len >= 1], got shape {ids.shape} "
                         f"and dtype {ids.dtype} (one prompt: input_ids[None])")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}) (the vocabulary), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    batch, length = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.astype(np.int32)
    if (mask.sum(axis=1) == 0).any():
        raise ValueError(f"rows {np.flatnonzero(mask.sum(axis=1) == 0).tolist()} of the batch have no token "
                         "(attention_mask all 0); every prompt needs at least one token")
    if (np.diff(mask, axis=1) < 0).any():
        bad = np.flatnonzero((np.diff(mask, axis=1) < 0).any(axis=1)).tolist()
        raise ValueError(f"rows {bad} of the batch have padding after a token: generation needs LEFT-padded "
                         "prompts (attention_mask 0 only on the left), e.g. a tokenizer with padding_side='left'")
    max_len = length + int(max_new_tokens)
    if config.position_type == "learned" and max_len > config.max_position_embeddings:
        raise ValueError(f"prompt length {length} + max_new_tokens {max_new_tokens} = {max_len} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings} (learned positions); "
                         "shorten the prompt or generate fewer tokens")
    eos = _ids(config.eos_ids if eos_token_id is None else eos_token_id, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    pad = _ids(pad_token_id, "pad_token_id")
    if len(pad) != 1:
        raise ValueError(f"pad_token_id must be one token id, got {pad_token_id!r}")
    sampling = (Sampling(True, float(temperature), None if top_k is None else int(top_k),
                         None if top_p is None or float(top_p) == 1.0 else float(top_p))
                if do_sample else Sampling())
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    slot_mask = np.concatenate([mask, np.ones((batch, int(max_new_tokens)), np.int32)], axis=1)
    graphdef, state = nnx.split(model)
    return _Plan(graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(slot_mask), jnp.asarray(positions),
                 jnp.asarray(mask.sum(axis=1).astype(np.int32)), jax.random.key(seed), max_len,
                 int(max_new_tokens), _cache_dtype(model), sampling, eos, pad[0])


def _run_prefill(p: _Plan):
    return _prefill(p.graphdef, p.state, p.input_ids, p.slot_mask, p.position_ids, p.key, max_len=p.max_len,
                    cache_dtype=p.cache_dtype, sampling=p.sampling, eos=p.eos, pad=p.pad)


def _run_decode(p: _Plan, prefilled, keep_logits: bool):
    token, done, cache, logits = prefilled
    return _decode(p.graphdef, p.state, cache, token, done, p.slot_mask, p.next_position, p.key, logits,
                   num_new=p.num_new, sampling=p.sampling, eos=p.eos, pad=p.pad, keep_logits=keep_logits)


# ----------------------------------------------------------------------------- public API
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             return_logits: bool = False):
    """Continue each prompt by ``max_new_tokens`` tokens -> int32 numpy [B, T + max_new_tokens].

    Args:
      model: a `efficient_nlp.models.DecoderForCausalLM`.
      input_ids, attention_mask: [B, T] prompts, LEFT-padded (mask 0 on the left; None: no padding).
      max_new_tokens: number of tokens to add (>= 1).
      do_sample: False (default) takes the most probable token; True samples with
        ``temperature`` (> 0), ``top_k`` (None or >= 1) and ``top_p`` (None or in (0, 1]), see
        `sample_logits`; these three are ignored when greedy.
      seed: the sampling key (same seed, same tokens).
      eos_token_id: id or ids that end a row (default ``model.config.eos_ids``; ``()``: never
        stop).  A finished row continues with ``pad_token_id`` (default the config's, else the
        first eos id, else 0); generation stops once every row has finished.
      return_logits: also return the logits each new token was chosen from, float32
        [B, max_new_tokens, V] (steps not run after every row finished are 0; a finished
        row's logits are meaningless).
    """
    plan = _plan(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id)
    prefilled = _run_prefill(plan)
    if plan.num_new > 1:
        new, logits = _run_decode(plan, prefilled, return_logits)
    else:
        new, logits = prefilled[0][:, None], prefilled[3][:, None]
    tokens = np.concatenate([np.asarray(plan.input_ids), np.asarray(new)], axis=1)
    return (tokens, np.asarray(logits)) if return_logits else tokens


def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, *, repeats: int = 3, seed: int = 0) -> dict:
    """Time generation on random prompts of ``batch`` x ``prompt_len`` (no padding, no early
    stop): medians over ``repeats`` runs after one untimed run (compilation excluded).

    Returns a dict: ``prefill_ms`` (the prompt pass and the first token), ``decode_ms`` (the
    ``new_tokens - 1`` remaining steps), ``decode_tokens_per_s`` (``batch * (new_tokens - 1)``
    per decode second), ``generate_ms`` (a whole `generate` call, from numpy in to numpy out),
    ``compile_s`` (the first, untimed run)."""
    if repeats < 1 or new_tokens < 2:
        raise ValueError(f"need repeats >= 1 and new_tokens >= 2, got {repeats} and {new_tokens}")
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, prompt_len)).astype(np.int32)
    kwargs = dict(max_new_tokens=new_tokens, eos_token_id=())
    plan = _plan(model, ids, None, do_sample=False, temperature=1.0, top_k=None, top_p=None, seed=seed,
                 eos_token_id=(), pad_token_id=None, max_new_tokens=new_tokens)
    start = time.perf_counter()
    jax.block_until_ready(_run_decode(plan, jax.block_until_ready(_run_prefill(plan)), False))
    generate(model, ids, **kwargs)
    compile_s = time.perf_counter() - start
    prefill, decode, whole = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        prefilled = jax.block_until_ready(_run_prefill(plan))
        middle = time.perf_counter()
        jax.block_until_ready(_run_decode(plan, prefilled, False))
        end = time.perf_counter()
        generate(model, ids, **kwargs)
        whole.append(time.perf_counter() - end)
        prefill.append(middle - start)
        decode.append(end - middle)
    decode_s = float(np.median(decode))
    return {"prefill_ms": 1e3 * float(np.median(prefill)), "decode_ms": 1e3 * decode_s,
            "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
            "generate_ms": 1e3 * float(np.median(whole)), "compile_s": compile_s}
