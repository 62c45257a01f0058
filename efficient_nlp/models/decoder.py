"""Decoder-only language models (GPT-2 and the Llama family) in Flax NNX.

One module tree serves both families; `DecoderConfig` says what differs (norm, positions,
gated FFN, biases, grouped-query attention, tied head).  A layer is pre-norm:

    h = x + o(attention(norm_1(x)))          # causal, rotary or learned positions
    y = h + ffn(norm_2(h))                   # down(act(gate(z)) * up(z)) when gated, else out(act(in(z)))

Parameter paths (for rules and the family description; ``{bb}`` is ``gpt2`` or ``llama``)::

    {bb}.embeddings.word_embeddings.embedding   {bb}.embeddings.position_embeddings.embedding (GPT-2)
    {bb}.layers.<i>.attention.norm              {bb}.layers.<i>.attention.{query,key,value,output}
    {bb}.layers.<i>.ffn.norm                    {bb}.layers.<i>.ffn.{intermediate,gate,output}
    {bb}.final_norm                             lm_head.kernel (untied heads only)

Grouped-query attention: ``key`` / ``value`` have ``num_kv_heads`` heads, each shared by a
group of ``num_heads / num_kv_heads`` consecutive query heads.  Rotary position embedding
(Su et al. 2021): the pairs ``(x_j, x_{j+D/2})`` of q and k are rotated by ``p * inv_freq_j`` at
position ``p``; ``inv_freq_j = theta^(-2j/D)``, divided by ``factor`` ("linear" scaling) or
smoothly between 1 and ``factor`` by wavelength ("llama3", Llama 3.1's long-context scaling).

Key/value cache: `KVCache` holds per layer the keys and values of ``max_len`` slots; a call
with ``cache=`` writes the new tokens' keys / values at slots ``index .. index+T-1`` and lets a
query at slot ``s`` see slots ``<= s`` whose ``attention_mask`` is 1 (the mask covers all
``max_len`` slots, so left padding is masked out).  The shapes never change during decoding,
so a jitted step compiles once (`efficient_nlp.models.generate`).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.models.bert import (LAYER_CAPTURE_NAMES, MASK_VALUE, _check_rngs, activation,
                                       check_capture, drop_rates)
from efficient_nlp.models.decoder_config import DecoderConfig
from efficient_nlp.models.dropout import Dropout


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``max_len`` slots, and the number of slots written.

    ``keys[i]`` / ``values[i]``: [B, num_kv_heads_i, max_len, head_dim]; ``index``: int32 scalar.
    """

    keys: tuple
    values: tuple
    index: jax.Array

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        d = config.attention_head_dim
        shapes = [(batch, config.layer_num_kv_heads(i), max_len, d) for i in range(config.num_hidden_layers)]
        return cls(keys=tuple(jnp.zeros(s, dtype) for s in shapes),
                   values=tuple(jnp.zeros(s, dtype) for s in shapes), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0


@flax.struct.dataclass
class DecoderOutput:
    """Output of the decoder models: ``last_hidden_state`` [B,T,H] (after the final norm),
    ``logits`` [B,T,V] (None for the bare model), ``intermediates`` (``capture=``), ``cache``
    (the updated `KVCache`, or None)."""

    last_hidden_state: jax.Array
    logits: jax.Array | None = None
    intermediates: dict[str, Any] = flax.struct.field(default_factory=dict)
    cache: KVCache | None = None


# ----------------------------------------------------------------------------- positions and masks
def rope_frequencies(config: DecoderConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] (float32) with the config's scaling."""
    d = config.attention_head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    scaling = config.rope_scaling_dict
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_len = float(scaling.get("original_max_position_embeddings", config.max_position_embeddings))
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return np.asarray(inv, np.float32)


def rope_tables(inv_freq, position_ids) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, head_dim] (float32) for integer ``position_ids`` [..., T]."""
    angles = jnp.asarray(position_ids, jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate head vectors ``x`` [B,N,T,D] by the angles of ``cos`` / ``sin`` [B or 1, T, D]; the
    rotation runs in float32 (a bfloat16 cos / sin of a large angle is off in its third digit),
    the result has the dtype of ``x``."""
    half = x.shape[-1] // 2
    y = x.astype(jnp.float32)
    rotated = jnp.concatenate([-y[..., half:], y[..., :half]], axis=-1)
    return (y * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def causal_bias(query_slots, num_slots: int, attention_mask=None, sliding_window: int | None = None):
    """Additive float32 bias [B or 1, 1, T, S]: a query at slot ``s`` sees slots ``<= s`` (and
    ``> s - sliding_window``) whose ``attention_mask`` [B, S] is 1."""
    keys = jnp.arange(num_slots)
    q = jnp.asarray(query_slots)[:, None]
    allowed = keys[None, :] <= q
    if sliding_window is not None:
        allowed = allowed & (keys[None, :] > q - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask)
        if mask.ndim != 2 or mask.shape[1] != num_slots:
            raise ValueError(f"attention_mask must be [batch, {num_slots}], got shape {mask.shape}")
        allowed = allowed & (mask[:, None, None, :] > 0)
    return jnp.where(allowed, 0.0, MASK_VALUE).astype(jnp.float32)


# ----------------------------------------------------------------------------- building blocks
def _dense(config, n_in, n_out, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=jax.nn.initializers.normal(config.initializer_range),
                      bias_init=jax.nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _norm(config: DecoderConfig, dtype, param_dtype, rngs):
    if config.norm_type == "rmsnorm":
        return nnx.RMSNorm(config.hidden_size, epsilon=config.norm_eps, use_fast_variance=False,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps, use_fast_variance=False,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DecoderAttention(nnx.Module):
    """Pre-norm causal self-attention with grouped key/value heads and the residual."""

    def __init__(self, config: DecoderConfig, *, num_heads: int, num_kv_heads: int, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, h = config.attention_head_dim, config.hidden_size
        self.head_dim = d
        self.norm = _norm(config, dtype, param_dtype, rngs)
        self.query = _dense(config, h, num_heads * d, config.qkv_bias, dtype, param_dtype, rngs)
        self.key = _dense(config, h, num_kv_heads * d, config.qkv_bias, dtype, param_dtype, rngs)
        self.value = _dense(config, h, num_kv_heads * d, config.qkv_bias, dtype, param_dtype, rngs)
        self.output = _dense(config, num_heads * d, h, config.o_bias, dtype, param_dtype, rngs)
        self.attn_dropout = Dropout(config.attention_probs_dropout_prob)
        self.dropout = Dropout(config.hidden_dropout_prob)
        # Hook for quantized q.k^T and probs.v (see `efficient_nlp.models.bert.BertAttention`).
        self.matmul_quant = None

    def __call__(self, x, bias, rope=None, cache=None, *, want: frozenset = frozenset(),
                 deterministic: bool = True, rngs=None):
        """x [B,T,H], bias [B|1,1,T,S], rope (cos, sin) or None, cache (keys, values, index) or
        None -> (out [B,T,H], captured, (keys, values) or None)."""
        b, t, _ = x.shape
        d = self.head_dim
        y = self.norm(x)

        def heads(z):  # [B,T,N*D] -> [B,N,T,D]
            return z.reshape(b, t, z.shape[-1] // d, d).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(y)), heads(self.key(y)), heads(self.value(y))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_cache = None
        if cache is not None:
            ck, cv, index = cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, index, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0))
            new_cache, k, v = (ck, cv), ck.astype(q.dtype), cv.astype(q.dtype)
        n, kv = q.shape[1], k.shape[1]
        if kv and n != kv:  # grouped-query attention: each K/V head serves n // kv query heads
            k, v = jnp.repeat(k, n // kv, axis=1), jnp.repeat(v, n // kv, axis=1)
        mq = self.matmul_quant
        qk = jnp.matmul(q, k.transpose(0, 1, 3, 2)) if mq is None else mq.scores(q, k)
        scores = qk * (1.0 / math.sqrt(d))
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(v.dtype)
        dropped = self.attn_dropout(probs, deterministic=deterministic, rngs=rngs)
        context = jnp.matmul(dropped, v) if mq is None else mq.context(dropped, v)
        context = context.transpose(0, 2, 1, 3).reshape(b, t, n * d)
        out = x + self.dropout(self.output(context), deterministic=deterministic, rngs=rngs)
        captured = {}
        for name, value in (("attn_input", y), ("attn_scores", scores), ("attn_probs", probs), ("values", v),
                            ("context", context), ("mha_out", out)):
            if name in want:
                captured[name] = value
        return out, captured, new_cache


class DecoderFeedForward(nnx.Module):
    """Pre-norm FFN with the residual: ``down(act(gate(z)) * up(z))`` (gated) or
    ``output(act(intermediate(z)))``, ``z = norm(x)``."""

    def __init__(self, config: DecoderConfig, *, intermediate_size: int, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        h, i = config.hidden_size, intermediate_size
        self.hidden_act = config.hidden_act
        self.norm = _norm(config, dtype, param_dtype, rngs)
        self.gate = _dense(config, h, i, config.ffn_bias, dtype, param_dtype, rngs) if config.gated_ffn else None
        self.intermediate = _dense(config, h, i, config.ffn_bias, dtype, param_dtype, rngs)
        self.output = _dense(config, i, h, config.ffn_bias, dtype, param_dtype, rngs)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, x, *, want: frozenset = frozenset(), deterministic: bool = True, rngs=None):
        z = self.norm(x)
        act = activation(self.hidden_act)
        inner = act(self.gate(z)) * self.intermediate(z) if self.gate is not None else act(self.intermediate(z))
        out = x + self.dropout(self.output(inner), deterministic=deterministic, rngs=rngs)
        captured = {}
        for name, value in (("ffn_input", z), ("ffn_intermediate", inner), ("ffn_out", out)):
            if name in want:
                captured[name] = value
        return out, captured


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, index: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.attention = DecoderAttention(config, num_heads=config.layer_num_heads(index),
                                          num_kv_heads=config.layer_num_kv_heads(index), dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
        self.ffn = DecoderFeedForward(config, intermediate_size=config.layer_intermediate_size(index), dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, bias, rope=None, cache=None, *, want=frozenset(), deterministic=True, rngs=None):
        x, captured, new_cache = self.attention(x, bias, rope, cache, want=want, deterministic=deterministic,
                                                rngs=rngs)
        x, more = self.ffn(x, want=want, deterministic=deterministic, rngs=rngs)
        captured.update(more)
        return x, captured, new_cache


class DecoderEmbeddings(nnx.Module):
    """Token embedding (+ learned positions for GPT-2), then dropout."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(config.initializer_range)
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.position_embeddings = (nnx.Embed(config.max_position_embeddings, config.hidden_size,
                                              embedding_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                    if config.position_type == "learned" else None)
        self.dropout = Dropout(config.embedding_dropout_prob)

    def __call__(self, input_ids, position_ids, *, deterministic: bool = True, rngs=None):
        x = self.word_embeddings(jnp.asarray(input_ids))
        if self.position_embeddings is not None:
            n = self.position_embeddings.num_embeddings
            if jnp.shape(input_ids)[-1] > n:
                raise ValueError(f"sequence length {jnp.shape(input_ids)[-1]} exceeds the {n} learned positions "
                                 "(max_position_embeddings); cut the input into blocks of at most that length")
            x = x + self.position_embeddings(jnp.asarray(position_ids))
        return self.dropout(x, deterministic=deterministic, rngs=rngs)


class DecoderBackbone(nnx.Module):
    """Embeddings, the layer stack and the final norm, held under the family's name."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = DecoderEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, index=i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.final_norm = _norm(config, dtype, param_dtype, rngs)
        self.layer_drop = 0.0
        self.sliding_window = config.sliding_window
        self.inv_freq = (tuple(float(f) for f in rope_frequencies(config))
                         if config.position_type == "rotary" else None)


def _positions(input_ids, position_ids, offset=0):
    if position_ids is not None:
        return jnp.asarray(position_ids)
    return offset + jnp.arange(jnp.shape(input_ids)[-1])[None]


class Decoder(nnx.Module):
    """Common interface of the decoder models (`efficient_nlp.models.family` reads it):
    ``backbone``, ``embed`` / ``run_layers`` / ``head``, and ``__call__`` with an optional cache."""

    def _init_backbone(self, config, dtype, param_dtype, rngs):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"a decoder model needs a DecoderConfig, got {type(config).__name__}")
        self.config = config
        setattr(self, config.model_type, DecoderBackbone(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    @property
    def backbone(self) -> DecoderBackbone:
        return getattr(self, self.config.model_type)

    def embed(self, input_ids, token_type_ids=None, *, position_ids=None, deterministic: bool = True, rngs=None):
        """Token ids [B,T] -> the first layer's input [B,T,H] (token types do not exist in a
        decoder and are ignored)."""
        _check_rngs(deterministic, rngs)
        return self.backbone.embeddings(input_ids, _positions(input_ids, position_ids), deterministic=deterministic,
                                        rngs=rngs)

    def _layers(self, hidden, attention_mask, position_ids, cache, *, start, stop, capture, deterministic, rngs,
                layer_drop):
        _check_rngs(deterministic, rngs)
        want = check_capture(capture)
        bb = self.backbone
        n = len(bb.layers)
        stop = n if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise ValueError(f"need 0 <= start <= stop <= {n} (number of layers); got start={start}, stop={stop}")
        t = hidden.shape[1]
        index = 0 if cache is None else cache.index
        slots = index + jnp.arange(t)
        num_slots = t if cache is None else cache.max_len
        bias = causal_bias(slots, num_slots, attention_mask, bb.sliding_window)
        positions = _positions(hidden[..., 0], position_ids, index)
        rope = rope_tables(np.asarray(bb.inv_freq, np.float32), positions) if bb.inv_freq is not None else None
        rates = drop_rates(bb.layer_drop if layer_drop is None else layer_drop, n)
        per_layer = {name: [] for name in LAYER_CAPTURE_NAMES if name in want}
        states = [hidden] if "hidden_states" in want else None
        keys, values = (list(cache.keys), list(cache.values)) if cache is not None else (None, None)
        for i in range(start, stop):
            drop = not deterministic and rates[i] > 0.0
            if drop:
                keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rates[i])
            layer_cache = (keys[i], values[i], index) if cache is not None else None
            out, captured, new = bb.layers[i](hidden, bias, rope, layer_cache, want=want,
                                              deterministic=deterministic, rngs=rngs)
            hidden = jnp.where(keep, out, hidden) if drop else out
            if new is not None:
                keys[i], values[i] = new
            for name, value in captured.items():
                per_layer[name].append(value)
            if states is not None:
                states.append(hidden)
        intermediates = {name: tuple(v) for name, v in per_layer.items()}
        if states is not None:
            intermediates["hidden_states"] = tuple(states)
        new_cache = None if cache is None else KVCache(tuple(keys), tuple(values), cache.index + t)
        return hidden, intermediates, new_cache

    def run_layers(self, hidden_states, attention_mask=None, *, start: int = 0, stop: int | None = None,
                   capture: Iterable[str] = (), deterministic: bool = True, rngs=None, layer_drop=None,
                   position_ids=None):
        """Layers ``start .. stop-1`` (causal) -> ``(hidden, intermediates)``, as the encoders'."""
        hidden, intermediates, _ = self._layers(hidden_states, attention_mask, position_ids, None, start=start,
                                                stop=stop, capture=capture, deterministic=deterministic,
                                                rngs=rngs, layer_drop=layer_drop)
        return hidden, intermediates

    def head(self, hidden_states, *, deterministic: bool = True, rngs=None, pooled=None):
        """The last layer's output -> logits: final norm, then the LM head (None: bare model)."""
        return self._logits(self.backbone.final_norm(hidden_states))

    def _logits(self, normed):
        return None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, position_ids=None,
                 cache: KVCache | None = None, capture: Iterable[str] = (), deterministic: bool = True,
                 rngs=None) -> DecoderOutput:
        """Logits of every position.  ``attention_mask``: [B,T] (1 = token), or with ``cache``
        [B, max_len] over all slots.  ``position_ids`` default to the slot numbers."""
        want = check_capture(capture)
        index = 0 if cache is None else cache.index
        positions = _positions(input_ids, position_ids, index)
        _check_rngs(deterministic, rngs)
        emb = self.backbone.embeddings(input_ids, positions, deterministic=deterministic, rngs=rngs)
        hidden, intermediates, new_cache = self._layers(
            emb, attention_mask, positions, cache, start=0, stop=None, capture=want, deterministic=deterministic,
            rngs=rngs, layer_drop=None)
        if "embedding" in want:
            intermediates["embedding"] = emb
        normed = self.backbone.final_norm(hidden)
        return DecoderOutput(last_hidden_state=normed, logits=self._logits(normed), intermediates=intermediates,
                             cache=new_cache)


class DecoderModel(Decoder):
    """The bare decoder (``logits`` is None)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self._init_backbone(config, dtype, param_dtype, rngs)


class DecoderForCausalLM(Decoder):
    """Decoder + LM head: ``lm_head`` (no bias), or the transposed word embedding when
    ``tie_word_embeddings`` (then ``lm_head`` is None)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self._init_backbone(config, dtype, param_dtype, rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        _dense(config, config.hidden_size, config.vocab_size, False, dtype, param_dtype, rngs))

    @property
    def tied_head(self) -> bool:
        """The LM head reads the word embedding table."""
        return self.lm_head is None

    def _logits(self, normed):
        """float32 logits [B,T,V] whatever the compute dtype (the matmul runs in it)."""
        if self.lm_head is not None:
            return self.lm_head(normed).astype(jnp.float32)
        return self.backbone.embeddings.word_embeddings.attend(normed).astype(jnp.float32)
