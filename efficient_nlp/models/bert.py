"""BERT-family encoder and heads in Flax NNX.

The layout follows the original BERT (and HF ``BertModel``) exactly, so pretrained
checkpoints load tensor-for-tensor (see `efficient_nlp.models.hf_checkpoint`):

* embeddings: word + position + token-type, LayerNorm, dropout;
* N post-LayerNorm layers: multi-head self-attention (query / key / value / output Linear,
  residual, LayerNorm) then a feed-forward block (intermediate Linear, activation, output
  Linear, residual, LayerNorm);
* pooler: tanh(dense(first token));
* heads: sequence classification (dropout + Linear; ``num_labels == 1`` is regression, sentence
  pairs are the same head fed with ``token_type_ids``) and masked LM (dense + activation +
  LayerNorm, decoder tied to the word embedding plus a bias).

Every model holds its backbone under ``.bert`` (also the plain `BertModel`), so parameter paths
are the same for all three: ``bert.encoder.layers.<i>.attention.query.kernel`` etc.  The
models hold parameters only (no RNG state); dropout is active only with
``deterministic=False`` and an ``nnx.Rngs`` with a ``dropout`` stream passed at call time.

Intermediates are requested by name through ``capture=`` (see `CAPTURE_NAMES`).  The names are
static Python values, so the plain forward pass traces no extra work.  The attention width is
``num_heads * head_dim`` and need not equal ``hidden_size``; the number of heads of a layer is
read from its query kernel (``kernel.shape[1] // head_dim``), so physically removing heads only
needs smaller kernels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp.models.config import BertConfig
from efficient_nlp.models.dropout import Dropout

#: Names accepted by ``capture=``.  ``embedding`` is [B,T,H]; the per-layer entries are tuples
#: with one array per layer run: ``attn_scores`` [B,N,T,T] (scaled q.k before the mask bias),
#: ``attn_probs`` [B,N,T,T], ``values`` [B,N,T,D], ``context`` [B,T,N*D] (heads concatenated,
#: the input of the attention output dense), ``mha_out`` [B,T,H] (after attention output
#: dense + residual + LayerNorm), ``ffn_intermediate`` [B,T,I] (after activation), ``ffn_out``
#: [B,T,H] (layer output); ``hidden_states`` is a tuple of L+1 arrays, the input first.
#: ``attn_input`` / ``ffn_input`` [B,T,H] are the inputs of the q/k/v and ffn_in projections
#: (the layer input and ``mha_out`` in a post-LayerNorm encoder; the normalised residual
#: stream in a pre-norm decoder).
CAPTURE_NAMES = (
    "embedding",
    "attn_input",
    "ffn_input",
    "attn_scores",
    "attn_probs",
    "values",
    "context",
    "mha_out",
    "ffn_intermediate",
    "ffn_out",
    "hidden_states",
)
LAYER_CAPTURE_NAMES = ("attn_input", "ffn_input", "attn_scores", "attn_probs", "values", "context", "mha_out", "ffn_intermediate", "ffn_out")

#: Additive bias for masked keys: half of float32's most negative value, so adding a score to
#: it cannot overflow to -inf and a fully-masked row still gives a finite (uniform) softmax.
MASK_VALUE = 0.5 * float(jnp.finfo(jnp.float32).min)


def check_capture(capture: Iterable[str] | str) -> frozenset[str]:
    """Validate capture names; returns them as a frozenset.  Unknown name -> ValueError."""
    if isinstance(capture, str):
        capture = (capture,)
    names = frozenset(capture)
    unknown = sorted(names.difference(CAPTURE_NAMES))
    if unknown:
        raise ValueError(f"unknown capture name(s) {unknown}; valid names are {CAPTURE_NAMES}")
    return names


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function for a HF ``hidden_act`` name."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unsupported hidden_act {name!r}")


def attention_bias(attention_mask: jax.Array | None) -> jax.Array | None:
    """[B,T] mask (1 = token, 0 = pad) -> additive float32 bias [B,1,1,T] (0 or `MASK_VALUE`)."""
    if attention_mask is None:
        return None
    mask = jnp.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq_len], got shape {mask.shape}")
    return jnp.where(mask[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(jnp.float32)


def _check_rngs(deterministic: bool, rngs) -> None:
    if not deterministic and rngs is None:
        raise ValueError(
            "deterministic=False needs rngs, e.g. rngs=nnx.Rngs(dropout=0) (a 'dropout' stream); "
            "the model holds no RNG state."
        )


@flax.struct.dataclass
class BertOutput:
    """Output of every BERT model (a pytree; None fields are empty subtrees).

    Attributes:
      last_hidden_state: [B,T,H] output of the last layer.
      pooler_output: [B,H] tanh-pooled first token, or None (no pooler, e.g. masked LM).
      logits: head output ([B,num_labels] or [B,T,vocab]), or None for `BertModel`.
      intermediates: dict of captured tensors (empty unless requested with ``capture=``).
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None
    logits: jax.Array | None = None
    intermediates: dict[str, Any] = flax.struct.field(default_factory=dict)


# ----------------------------------------------------------------------------- building blocks
def _linear(config: BertConfig, n_in: int, n_out: int, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out,
        kernel_init=jax.nn.initializers.normal(config.initializer_range),
        bias_init=jax.nn.initializers.zeros,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


def _layer_norm(config: BertConfig, n: int, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2], as torch does (needed for 1e-5 parity).
    return nnx.LayerNorm(
        n, epsilon=config.layer_norm_eps, use_fast_variance=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


def _embed(config: BertConfig, n: int, h: int, dtype, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(
        n, h, embedding_init=jax.nn.initializers.normal(config.initializer_range),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    """word + position (+ token-type) embeddings, then LayerNorm and dropout (+ projection).

    Family traits (`BertConfig.traits`): no token-type table when ``type_vocab_size == 0``
    (DistilBERT); RoBERTa's position ids ``cumsum(ids != pad) * (ids != pad) + pad`` (padding
    tokens sit at ``pad``, the first real token at ``pad + 1``); ELECTRA's tables of width
    ``embedding_size`` followed by ``project`` (a Linear to ``hidden_size``).
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        e = config.embedding_width
        self.padded_positions = config.traits.padded_positions
        self.pad_token_id = config.pad_token_id
        self.word_embeddings = _embed(config, config.vocab_size, e, dtype, param_dtype, rngs)
        self.position_embeddings = _embed(config, config.max_position_embeddings, e, dtype, param_dtype, rngs)
        self.token_type_embeddings = (_embed(config, config.type_vocab_size, e, dtype, param_dtype, rngs)
                                      if config.type_vocab_size > 0 else None)
        self.layer_norm = _layer_norm(config, e, dtype, param_dtype, rngs)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.project = (_linear(config, e, config.hidden_size, dtype, param_dtype, rngs)
                        if e != config.hidden_size else None)

    def position_ids(self, input_ids) -> jax.Array:
        """[B,T] (or [T]) position ids of ``input_ids``."""
        seq_len = input_ids.shape[-1]
        if not self.padded_positions:
            return jnp.arange(seq_len)
        real = (input_ids != self.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(real, axis=-1) * real + self.pad_token_id

    def __call__(self, input_ids, token_type_ids=None, *, deterministic: bool = True, rngs=None) -> jax.Array:
        _check_rngs(deterministic, rngs)
        input_ids = jnp.asarray(input_ids)
        seq_len = input_ids.shape[-1]
        max_len = self.position_embeddings.num_embeddings
        needed = seq_len + (self.pad_token_id + 1 if self.padded_positions else 0)
        if needed > max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings={max_len}"
                             + (f" (positions start after the padding index {self.pad_token_id})"
                                if self.padded_positions else ""))
        pos = self.position_embeddings(self.position_ids(input_ids))
        x = self.word_embeddings(input_ids) + (pos if self.padded_positions else pos[None])
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
            x = x + self.token_type_embeddings(jnp.asarray(token_type_ids))
        x = self.layer_norm(x)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return self.project(x) if self.project is not None else x


class BertAttention(nnx.Module):
    """Multi-head self-attention with output dense, (dropout,) residual and post-LayerNorm.

    ``num_heads`` (default ``config.num_attention_heads``) may be smaller, even 0, for a
    physically pruned layer.
    """

    def __init__(self, config: BertConfig, *, num_heads: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.head_dim = config.attention_head_dim
        n = config.num_attention_heads if num_heads is None else num_heads
        h, w = config.hidden_size, n * self.head_dim
        self.query = _linear(config, h, w, dtype, param_dtype, rngs)
        self.key = _linear(config, h, w, dtype, param_dtype, rngs)
        self.value = _linear(config, h, w, dtype, param_dtype, rngs)
        self.output = _linear(config, w, h, dtype, param_dtype, rngs)
        self.layer_norm = _layer_norm(config, h, dtype, param_dtype, rngs)
        self.attn_dropout = Dropout(config.attention_probs_dropout_prob)
        self.dropout = Dropout(config.hidden_dropout_prob if config.traits.attention_output_dropout else 0.0)
        # Hook for quantized q.k^T and probs.v (`efficient_nlp.quant`): an object whose
        # scores(q, k) returns q @ k^T and context(probs, v) returns probs @ v.
        self.matmul_quant = None

    def __call__(self, x, bias=None, *, want: frozenset = frozenset(), deterministic: bool = True, rngs=None):
        """x [B,T,H], bias [B,1,1,T] additive (or None) -> (out [B,T,H], captured dict)."""
        b, t, _ = x.shape
        d = self.head_dim

        def heads(y):  # [B,T,N*D] -> head-major [B,N,T,D]
            return y.reshape(b, t, y.shape[-1] // d, d).transpose(0, 2, 1, 3)

        # Head-major layout with plain batched matmuls: XLA:CPU runs these ~4x faster than
        # an einsum over [B,T,N,D] operands (benchmarks/train_step_vs_torch.py).
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        mq = self.matmul_quant
        qk = jnp.matmul(q, k.transpose(0, 1, 3, 2)) if mq is None else mq.scores(q, k)
        scores = qk * (1.0 / math.sqrt(d))
        logits = scores.astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        dropped = self.attn_dropout(probs, deterministic=deterministic, rngs=rngs)
        context = jnp.matmul(dropped, v) if mq is None else mq.context(dropped, v)
        context = context.transpose(0, 2, 1, 3).reshape(b, t, -1)
        out = self.dropout(self.output(context), deterministic=deterministic, rngs=rngs)
        out = self.layer_norm(out + x)
        captured = {}
        if "attn_input" in want:
            captured["attn_input"] = x
        if "ffn_input" in want:
            captured["ffn_input"] = out
        if "attn_scores" in want:
            captured["attn_scores"] = scores
        if "attn_probs" in want:
            captured["attn_probs"] = probs
        if "values" in want:
            captured["values"] = v
        if "context" in want:
            captured["context"] = context
        if "mha_out" in want:
            captured["mha_out"] = out
        return out, captured


class BertFeedForward(nnx.Module):
    """intermediate Linear -> activation -> output Linear -> dropout -> residual -> LayerNorm.

    ``intermediate_size`` (default ``config.intermediate_size``) may be smaller, even 0.
    """

    def __init__(self, config: BertConfig, *, intermediate_size: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        h = config.hidden_size
        i = config.intermediate_size if intermediate_size is None else intermediate_size
        self.hidden_act = config.hidden_act
        self.intermediate = _linear(config, h, i, dtype, param_dtype, rngs)
        self.output = _linear(config, i, h, dtype, param_dtype, rngs)
        self.layer_norm = _layer_norm(config, h, dtype, param_dtype, rngs)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, x, *, want: frozenset = frozenset(), deterministic: bool = True, rngs=None):
        inner = activation(self.hidden_act)(self.intermediate(x))
        out = self.dropout(self.output(inner), deterministic=deterministic, rngs=rngs)
        out = self.layer_norm(out + x)
        captured = {}
        if "ffn_intermediate" in want:
            captured["ffn_intermediate"] = inner
        if "ffn_out" in want:
            captured["ffn_out"] = out
        return out, captured


class BertLayer(nnx.Module):
    """One transformer layer: `BertAttention` then `BertFeedForward`.

    ``index`` selects the layer's own head count / FFN width when the config has per-layer sizes.
    """

    def __init__(self, config: BertConfig, *, index: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.attention = BertAttention(config, num_heads=config.layer_num_heads(index), dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.ffn = BertFeedForward(config, intermediate_size=config.layer_intermediate_size(index),
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, bias=None, *, want: frozenset = frozenset(), deterministic: bool = True, rngs=None):
        x, captured = self.attention(x, bias, want=want, deterministic=deterministic, rngs=rngs)
        x, more = self.ffn(x, want=want, deterministic=deterministic, rngs=rngs)
        captured.update(more)
        return x, captured


def drop_rates(value, n: int) -> tuple[float, ...]:
    """LayerDrop rates, one per layer, from a float or a sequence of ``n`` floats in [0, 1]."""
    if isinstance(value, (int, float)):
        rates = (float(value),) * n
    else:
        rates = tuple(float(v) for v in value)
        if len(rates) != n:
            raise ValueError(f"layer_drop needs one rate per layer ({n}), got {len(rates)}")
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"layer_drop rates must be in [0, 1], got {value!r}")
    return rates


class BertEncoder(nnx.Module):
    """The stack of layers (``layers`` is an ``nnx.List``); can run any range [start, stop).

    LayerDrop (Fan et al. 2020, docs/pruning.md): with ``deterministic=False`` each layer is
    skipped (its input passed through unchanged) with probability ``layer_drop``; the Bernoulli
    draw comes from the ``dropout`` stream of ``rngs`` and selects with ``jnp.where`` (jit-safe;
    the layer is still computed).  ``layer_drop`` is a float or one float per layer; when not
    given, the module attribute ``layer_drop`` (default 0.0: the plain forward) is used, so a
    model trained with LayerDrop needs no other change than ``model.bert.encoder.layer_drop = p``.
    At ``deterministic=True`` no layer is dropped.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [BertLayer(config, index=i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for i in range(config.num_hidden_layers)]
        )
        self.layer_drop = 0.0

    def __call__(self, hidden_states, attention_mask=None, *, start: int = 0, stop: int | None = None,
                 capture: Iterable[str] = (), deterministic: bool = True, rngs=None, layer_drop=None,
                 bias=None):
        """Run layers ``start .. stop-1`` on ``hidden_states`` [B,T,H].

        Returns ``(hidden_states, intermediates)``; per-layer captures are tuples with one entry
        per layer run and ``hidden_states`` (if requested) has the input first, so its length is
        ``stop - start + 1``.  ``embedding`` is produced by the model, not here (ignored).
        ``layer_drop``: skip probability (float, or a sequence indexed by absolute layer number;
        see the class docstring); for a dropped layer ``hidden_states`` holds its input.
        ``bias``: an additive float32 attention bias [B,1,1,T] (per key) or [B,1,T,T] used by every
        layer run instead of the one built from ``attention_mask`` (token skipping re-weights keys
        with it, `efficient_nlp.dynamic.tokens`); None (default): built from ``attention_mask``.
        """
        _check_rngs(deterministic, rngs)
        want = check_capture(capture)
        n = len(self.layers)
        stop = n if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
            raise ValueError(f"need 0 <= start <= stop <= {n} (number of layers); got start={start}, stop={stop}")
        rates = drop_rates(self.layer_drop if layer_drop is None else layer_drop, n)
        bias = attention_bias(attention_mask) if bias is None else jnp.asarray(bias, jnp.float32)
        per_layer = {name: [] for name in LAYER_CAPTURE_NAMES if name in want}
        states = [hidden_states] if "hidden_states" in want else None
        for i in range(start, stop):
            drop = not deterministic and rates[i] > 0.0
            if drop:  # drawn before the layer's own dropout keys
                keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rates[i])
            out, captured = self.layers[i](
                hidden_states, bias, want=want, deterministic=deterministic, rngs=rngs)
            hidden_states = jnp.where(keep, out, hidden_states) if drop else out
            for name, value in captured.items():
                per_layer[name].append(value)
            if states is not None:
                states.append(hidden_states)
        intermediates = {name: tuple(values) for name, values in per_layer.items()}
        if states is not None:
            intermediates["hidden_states"] = tuple(states)
        return hidden_states, intermediates


class BertPooler(nnx.Module):
    """tanh(dense(hidden_states[:, 0]))."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = _linear(config, config.hidden_size, config.hidden_size, dtype, param_dtype, rngs)

    def __call__(self, hidden_states):
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class BertBackbone(nnx.Module):
    """Embeddings + encoder (+ pooler): the backbone of every encoder model, held under the
    family's name (``.bert``, ``.roberta``, ``.distilbert``, ``.electra``; see `Encoder.backbone`)."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = BertEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pooler = (BertPooler(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if add_pooling_layer and config.traits.base_pooler else None)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, capture: Iterable[str] = (),
                 deterministic: bool = True, rngs=None, pool: bool = True) -> BertOutput:
        """``pool=False`` leaves ``pooler_output`` None (a head that pools computes it once)."""
        _check_rngs(deterministic, rngs)
        want = check_capture(capture)
        emb = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
        hidden, intermediates = self.encoder(
            emb, attention_mask, capture=want, deterministic=deterministic, rngs=rngs)
        if "embedding" in want:
            intermediates["embedding"] = emb
        pooled = self.pooler(hidden) if self.pooler is not None and pool else None
        return BertOutput(last_hidden_state=hidden, pooler_output=pooled, logits=None,
                          intermediates=intermediates)


# ----------------------------------------------------------------------------- models
class Encoder(nnx.Module):
    """Common interface of the encoder models (what `efficient_nlp.models.family` reads).

    The backbone lives under the family's name (``model.bert`` for BERT, ``model.roberta`` ...);
    ``backbone`` returns it whatever the family.  ``embed`` / ``run_layers`` / ``head`` are the
    three pieces of the forward pass, so a transform can run any range of layers on its own.
    """

    def _init_backbone(self, config, add_pooling_layer, dtype, param_dtype, rngs):
        self.config = config
        setattr(self, config.model_type, BertBackbone(config, add_pooling_layer=add_pooling_layer, dtype=dtype,
                                                      param_dtype=param_dtype, rngs=rngs))

    @property
    def backbone(self) -> BertBackbone:
        return getattr(self, self.config.model_type)

    def embed(self, input_ids, token_type_ids=None, *, deterministic: bool = True, rngs=None) -> jax.Array:
        """Token ids -> the first layer's input [B,T,H]."""
        return self.backbone.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)

    def run_layers(self, hidden_states, attention_mask=None, **kwargs):
        """Layers ``start .. stop-1`` (keywords of `BertEncoder.__call__`) -> (hidden, intermediates)."""
        return self.backbone.encoder(hidden_states, attention_mask, **kwargs)

    def head(self, hidden_states, *, deterministic: bool = True, rngs=None, pooled=None):
        """The last layer's output [B,T,H] -> float32 logits whatever the compute dtype (None for
        the bare encoder); ``pooled``: the pooler's output when already computed."""
        return None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, capture: Iterable[str] = (),
                 deterministic: bool = True, rngs=None) -> BertOutput:
        out = self.backbone(input_ids, attention_mask, token_type_ids, capture=capture,
                            deterministic=deterministic, rngs=rngs)
        return out.replace(logits=self.head(out.last_hidden_state, deterministic=deterministic, rngs=rngs,
                                            pooled=out.pooler_output))


class BertModel(Encoder):
    """The bare encoder (with the tanh pooler when HF's bare model of the family has one: BERT,
    RoBERTa); ``logits`` is None.

    Args:
      config: the `BertConfig` (its ``model_type`` picks the family).
      rngs: ``nnx.Rngs`` used to initialise parameters (e.g. ``nnx.Rngs(0)``).
      dtype: computation dtype; param_dtype: storage dtype of the parameters.
      add_pooling_layer: build the tanh pooler (HF base checkpoints have one).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 add_pooling_layer: bool = True):
        self._init_backbone(config, add_pooling_layer, dtype, param_dtype, rngs)


class BertForSequenceClassification(Encoder):
    """Encoder + sequence-classification head, as HF defines it for the family.

    BERT: pooler (tanh dense on the first token) + dropout + ``classifier``.  Other families:
    the first token, (dropout,) ``pre_classifier`` dense, activation (RoBERTa tanh, ELECTRA
    GELU, DistilBERT ReLU), dropout, ``classifier``.  ``num_labels == 1`` means regression (the
    logits are the prediction, shape [B,1]); sentence pair tasks use the same head with
    ``token_type_ids`` marking the second segment (families with token types).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self._init_backbone(config, config.traits.pooler, dtype, param_dtype, rngs)
        rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(rate)
        self.pre_classifier = (None if config.traits.pooler else
                               _linear(config, config.hidden_size, config.hidden_size, dtype, param_dtype, rngs))
        self.classifier = _linear(config, config.hidden_size, config.num_labels, dtype, param_dtype, rngs)

    def head(self, hidden_states, *, deterministic: bool = True, rngs=None, pooled=None):
        traits = self.config.traits
        if self.pre_classifier is None:
            pooled = self.backbone.pooler(hidden_states) if pooled is None else pooled
        else:
            x = hidden_states[:, 0]
            if traits.classifier_in_dropout:
                x = self.dropout(x, deterministic=deterministic, rngs=rngs)
            x = self.pre_classifier(x)
            pooled = jnp.tanh(x) if traits.classifier_act == "tanh" else activation(traits.classifier_act)(x)
        pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
        return self.classifier(pooled).astype(jnp.float32)  # float32 logits for the loss


class BertLMHead(nnx.Module):
    """MLM prediction head: dense + activation + LayerNorm, then the tied decoder + bias.

    The transform maps ``hidden_size`` to the embedding width (ELECTRA's generator: smaller)."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        e = config.embedding_width
        self.hidden_act = config.traits.lm_act or config.hidden_act
        self.dense = _linear(config, config.hidden_size, e, dtype, param_dtype, rngs)
        self.layer_norm = _layer_norm(config, e, dtype, param_dtype, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), dtype=param_dtype))

    def __call__(self, hidden_states, word_embedding):
        """hidden_states [B,T,H], word_embedding [V,E] -> float32 logits [B,T,V] (the matmul in
        the compute dtype)."""
        h = self.layer_norm(activation(self.hidden_act)(self.dense(hidden_states)))
        logits = jnp.einsum("bth,vh->btv", h, word_embedding.astype(h.dtype))
        return logits.astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class BertForMaskedLM(Encoder):
    """Encoder (no pooler, as in HF) + `BertLMHead` tied to the word embedding."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self._init_backbone(config, False, dtype, param_dtype, rngs)
        self.lm_head = BertLMHead(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    #: The LM head reads the word embedding table.
    tied_head = True

    def head(self, hidden_states, *, deterministic: bool = True, rngs=None, pooled=None):
        embedding = self.backbone.embeddings.word_embeddings.embedding[...]
        return self.lm_head(hidden_states, embedding)


#: Family-neutral names of the same classes.
EncoderModel = BertModel
EncoderForSequenceClassification = BertForSequenceClassification
EncoderForMaskedLM = BertForMaskedLM
