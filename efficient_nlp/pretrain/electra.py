"""ELECTRA: pre-training an encoder by replaced-token detection (Clark et al. 2020).

A small masked-LM *generator* and the encoder being pre-trained, the *discriminator*, are
trained together on each batch ``x`` (token ids, ``m`` the real-token mask):

1. select ~15% of the real, non-special positions ``S`` and corrupt them for the generator
   (`efficient_nlp.pretrain.mlm.mask_tokens`; ELECTRA's own code puts [MASK] at 85% of them and
   keeps the other 15% unchanged, our default);
2. the generator predicts the original tokens at ``S``: ``L_MLM`` is its cross-entropy there;
3. at every selected position a replacement is *sampled* from the generator's softmax with the
   Gumbel-max trick, ``x'_t = argmax_v (z_tv + g_tv)``, ``g ~ Gumbel(0, 1)`` (no gradient flows
   through the sample: the generator learns from ``L_MLM`` only);
4. the discriminator reads ``x`` with the positions of ``S`` replaced by the samples and predicts
   for EVERY real position (special tokens included, as in the official implementation) whether
   the token was replaced: ``y_t = [t in S and x'_t != x_t]`` (a sample equal to the original
   counts as original), ``L_disc`` the binary cross-entropy of its logits averaged over the real
   positions;
5. ``L = L_MLM + lambda * L_disc`` with ``lambda = 50`` (the paper's weight).

The generator is the discriminator's shape scaled down (`generator_config`: hidden size, heads
and FFN width times ``fraction``; the paper finds 1/4 to 1/2 of the discriminator's size best)
and both share one set of embeddings: the token, position and token-type tables and the
embedding LayerNorm are the same NNX modules in both models (`ElectraPretrainer`), so they stay
one set of parameters through ``nnx.split`` / ``merge``, optimizer updates and checkpoints.  Each
model keeps its own projection from the embedding width to its hidden size.  After training,
the discriminator (`discriminator_of`) is the pre-trained encoder: ``save_hf_checkpoint`` writes
it as a HF ``ElectraForPreTraining`` directory and ``from_pretrained(dir, num_labels=k)``
fine-tunes it as a classifier.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp.models.bert import BertForMaskedLM
from efficient_nlp.models.config import BertConfig
from efficient_nlp.models.electra_pretraining import ElectraForPreTraining
from efficient_nlp.pretrain.mlm import mask_tokens, mlm_loss

#: Embedding submodules the generator and the discriminator share (one module, two owners).
SHARED_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings", "layer_norm")
#: Config fields that must agree for the embeddings to be shared.
_SHARED_FIELDS = ("vocab_size", "embedding_width", "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
#: ELECTRA's corruption of the selected positions: 85% [MASK], 15% unchanged, no random token.
ELECTRA_MASK_PROB = 0.85
ELECTRA_RANDOM_PROB = 0.0


def _check_electra(config, what: str) -> None:
    if not isinstance(config, BertConfig):
        raise TypeError(f"{what} must be an efficient_nlp.models.BertConfig, got {type(config).__name__}")
    if config.model_type != "electra":
        raise ValueError(f"{what} has model_type={config.model_type!r}; ELECTRA pre-training builds ELECTRA "
                         "models: pass config.replace(model_type='electra')")


def generator_config(disc_config: BertConfig, fraction: float = 0.25) -> BertConfig:
    """The generator's config for a discriminator config: hidden size, attention heads (at least
    one) and FFN width are ``fraction`` of the discriminator's (rounded), with the same number of layers and
    the same embedding width (the embeddings are shared; a projection maps them to the smaller
    hidden size).  Clark et al. (2020) find generators of 1/4 to 1/2 of the discriminator's size
    work best.  Per-layer sizes and an explicit ``head_dim`` of the discriminator are not carried
    over (the generator's heads are ``hidden / heads`` wide).

    Raises ValueError when ``fraction`` is not in (0, 1] or the scaled sizes give no hidden unit,
    no FFN neuron or a hidden size the heads do not divide.
    """
    _check_electra(disc_config, "disc_config")
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"generator fraction must be in (0, 1], got {fraction}; ELECTRA uses 1/4 to 1/2")
    d = disc_config
    hidden = int(round(d.hidden_size * fraction))
    heads = max(1, int(round(d.num_attention_heads * fraction)))  # at least one head, as ELECTRA's code
    inter = int(round(d.intermediate_size * fraction))
    for name, value, full in (("hidden_size", hidden, d.hidden_size), ("num_attention_heads", heads,
                              d.num_attention_heads), ("intermediate_size", inter, d.intermediate_size)):
        if value < 1:
            raise ValueError(f"a generator of fraction {fraction} of the discriminator's {name}={full} would have "
                             f"{name}={value}; use a larger fraction (at least {1 / full:.3g}) or pass "
                             "generator_config explicitly")
    if hidden % heads:
        raise ValueError(f"the generator's hidden_size={hidden} ({fraction} x {d.hidden_size}) is not divisible by "
                         f"its num_attention_heads={heads} ({fraction} x {d.num_attention_heads}); choose a fraction "
                         "that keeps them divisible, or pass generator_config explicitly")
    return d.replace(hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
                     embedding_size=d.embedding_width, head_dim=None, layer_num_attention_heads=None,
                     layer_intermediate_sizes=None)


_scaled_generator_config = generator_config


def _check_shareable(disc: BertConfig, gen: BertConfig) -> None:
    _check_electra(gen, "the generator's config")
    bad = [f"{k}: discriminator {getattr(disc, k)}, generator {getattr(gen, k)}"
           for k in _SHARED_FIELDS if getattr(disc, k) != getattr(gen, k)]
    if bad:
        raise ValueError("the generator and the discriminator share their embeddings, so these must agree: "
                         + "; ".join(bad) + " (generator_config(disc_config, fraction) builds a matching one)")


class ElectraPretrainer(nnx.Module):
    """A generator (`BertForMaskedLM` of the ELECTRA family) and a discriminator
    (`efficient_nlp.models.ElectraForPreTraining`) sharing their embeddings (module doc).

    ``generator.electra.embeddings.<name>`` IS ``discriminator.electra.embeddings.<name>`` for
    every name in `SHARED_EMBEDDINGS`; the generator's tied MLM decoder therefore reads the shared
    word embedding.  Each model keeps its own ``embeddings.project`` when its hidden size differs
    from the embedding width.  Train it with `electra_loss_fn`; the pre-trained encoder is
    ``.discriminator`` (`discriminator_of`).

    ``nnx.state(pretrainer)`` holds each shared table once (under ``discriminator``).

    Args:
      disc_config: the discriminator's `BertConfig` (``model_type="electra"``).
      generator_fraction: the generator's width relative to the discriminator's (`generator_config`).
      rngs: ``nnx.Rngs`` for the initial weights (not needed with ``models``).
      generator_config: the generator's config instead of the scaled one (must agree with the
        discriminator's vocabulary, embedding width, positions, token types and LayerNorm epsilon).
      dtype, param_dtype: computation and parameter dtypes of both models.
      models: an existing ``(generator, discriminator)`` pair to hold instead of new models (e.g.
        after growing their layers, or loaded checkpoints); the generator's shared embedding
        modules are replaced by the discriminator's (the discriminator's values are kept).  Its
        configs must agree as above; ``disc_config`` may then be None.
    """

    def __init__(self, disc_config: BertConfig | None = None, *, generator_fraction: float = 0.25,
                 rngs: nnx.Rngs | None = None, generator_config: BertConfig | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, models: tuple | None = None):
        if models is not None:
            generator, discriminator = models
            if not isinstance(discriminator, ElectraForPreTraining) or not isinstance(generator, BertForMaskedLM):
                raise TypeError("models must be (generator: BertForMaskedLM, discriminator: ElectraForPreTraining), "
                                f"got ({type(generator).__name__}, {type(discriminator).__name__})")
            _check_electra(discriminator.config, "the discriminator's config")
            _check_shareable(discriminator.config, generator.config)
        else:
            if rngs is None:
                raise ValueError("ElectraPretrainer needs rngs=nnx.Rngs(seed) to initialise its models")
            _check_electra(disc_config, "disc_config")
            gen_config = (generator_config if generator_config is not None
                          else _scaled_generator_config(disc_config, generator_fraction))
            _check_shareable(disc_config, gen_config)
            discriminator = ElectraForPreTraining(disc_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            generator = BertForMaskedLM(gen_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.discriminator = discriminator
        self.generator = generator
        shared, own = discriminator.electra.embeddings, generator.electra.embeddings
        for name in SHARED_EMBEDDINGS:
            setattr(own, name, getattr(shared, name))


def discriminator_of(model) -> ElectraForPreTraining:
    """The pre-trained encoder of an `ElectraPretrainer` (its ``.discriminator``; an
    `ElectraForPreTraining` is returned as it is), e.g. for ``save_hf_checkpoint``."""
    if isinstance(model, ElectraForPreTraining):
        return model
    disc = getattr(model, "discriminator", None)
    if not isinstance(disc, ElectraForPreTraining):
        raise TypeError(f"expected an ElectraPretrainer (or its discriminator), got {type(model).__name__}")
    return disc


# ----------------------------------------------------------------------------- pure pieces
def replaced_labels(original, sampled, selected) -> jax.Array:
    """Replaced-token-detection targets [B,T] (bool): True where the position was selected and
    the generator's sample differs from the original token.  A sample equal to the original
    is labelled original, as in Clark et al. (2020)."""
    return jnp.asarray(selected, bool) & (jnp.asarray(sampled) != jnp.asarray(original))


def gumbel_max_sample(key, logits) -> jax.Array:
    """One token per position drawn from ``softmax(logits)`` over the last axis, by the
    Gumbel-max trick: ``argmax_v (z_v + g_v)`` with ``g_v`` i.i.d. standard Gumbel (``-log(-log u)``,
    ``u ~ U(0, 1)``) is distributed as ``softmax(z)``.  int32 [...]; no gradient."""
    z = jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))
    return jnp.argmax(z + jax.random.gumbel(key, z.shape, jnp.float32), axis=-1).astype(jnp.int32)


def replaced_token_loss(logits, labels, attention_mask) -> tuple[jax.Array, jax.Array]:
    """Binary cross-entropy of the discriminator's logits [B,T] against ``labels`` (replaced = 1)
    and the accuracy of ``logits > 0``, both averaged over the real positions (``attention_mask``
    1).  float32 scalars."""
    logits = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    w = (jnp.asarray(attention_mask) > 0).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    loss = (optax.sigmoid_binary_cross_entropy(logits, y) * w).sum() / n
    correct = ((logits > 0) == (y > 0.5)).astype(jnp.float32)
    return loss, (correct * w).sum() / n


def electra_terms(model: ElectraPretrainer, batch, mask_key, sample_key, *, vocab_size: int, mask_id: int,
                  special_ids: Sequence[int], rate: float = 0.15, mask_prob: float = ELECTRA_MASK_PROB,
                  random_prob: float = ELECTRA_RANDOM_PROB, deterministic: bool = True, rngs=None) -> dict:
    """Both models on one batch (steps 1-4 of the module doc) with the given masking and sampling
    keys: a dict of scalars ``mlm_loss``, ``mlm_accuracy``, ``disc_loss``, ``disc_accuracy``,
    ``replaced_fraction`` (replaced / real tokens) and the counts ``num_selected``, ``num_tokens``."""
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    mask = batch.get("attention_mask")
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    real = mask > 0
    types = batch.get("token_type_ids")
    corrupted, selected = mask_tokens(mask_key, ids, vocab_size=vocab_size, mask_id=mask_id,
                                      special_ids=tuple(special_ids), attention_mask=mask, rate=rate,
                                      mask_prob=mask_prob, random_prob=random_prob)
    selected = jnp.asarray(selected, bool) & real
    gen_logits = model.generator(corrupted, mask, types, deterministic=deterministic, rngs=rngs).logits
    mlm, mlm_acc = mlm_loss(gen_logits, ids, selected)
    sampled = gumbel_max_sample(sample_key, gen_logits)
    disc_input = jnp.where(selected, sampled, ids)
    labels = replaced_labels(ids, sampled, selected)
    disc_logits = model.discriminator(disc_input, mask, types, deterministic=deterministic, rngs=rngs).logits
    disc, disc_acc = replaced_token_loss(disc_logits, labels, mask)
    num_tokens = real.sum().astype(jnp.float32)
    return {"mlm_loss": mlm, "mlm_accuracy": mlm_acc, "disc_loss": disc, "disc_accuracy": disc_acc,
            "replaced_fraction": (labels & real).sum() / jnp.maximum(num_tokens, 1.0),
            "num_selected": selected.sum().astype(jnp.float32), "num_tokens": num_tokens}


def _checked_options(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob) -> dict:
    """The masking options, validated now (by `mask_tokens` on a dummy input) rather than when
    the training step is traced."""
    options = dict(vocab_size=int(vocab_size), mask_id=int(mask_id), special_ids=tuple(int(i) for i in special_ids),
                   rate=float(rate), mask_prob=float(mask_prob), random_prob=float(random_prob))
    mask_tokens(jax.random.key(0), np.zeros((1, 1), np.int32), **options)
    return options


def electra_loss_fn(*, vocab_size: int, mask_id: int, special_ids: Sequence[int], rate: float = 0.15,
                    disc_weight: float = 50.0, mask_prob: float = ELECTRA_MASK_PROB,
                    random_prob: float = ELECTRA_RANDOM_PROB):
    """``loss_fn(model, batch, rngs) -> (loss, aux)`` for `efficient_nlp.train.fit` / ``run`` on an
    `ElectraPretrainer`: ``loss = mlm_loss + disc_weight * disc_loss`` (module doc).

    The masking and sampling keys are split from one draw of ``rngs.dropout()`` (so they are a
    function of the seed and the step); both models run with dropout.  ``aux``: ``mlm_loss``,
    ``mlm_accuracy``, ``disc_loss``, ``disc_accuracy``, ``replaced_fraction``.

    Args:
      vocab_size, mask_id, special_ids: the tokenizer's (special tokens are never selected).
      rate: fraction of the real tokens selected (15%).
      disc_weight: lambda, the weight of the discriminator's loss (50 in Clark et al. 2020).
      mask_prob, random_prob: of the selected tokens, the fraction shown to the generator as
        [MASK] and as a random token (the rest unchanged); ELECTRA's 0.85 and 0.0 by default.
    """
    options = _checked_options(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob)
    weight = float(disc_weight)
    if not weight >= 0.0:
        raise ValueError(f"disc_weight (the weight of the discriminator's loss) must be >= 0, got {disc_weight}")

    def loss_fn(model, batch, rngs):
        mask_key, sample_key = jax.random.split(rngs.dropout())
        t = electra_terms(model, batch, mask_key, sample_key, deterministic=False, rngs=rngs, **options)
        loss = t["mlm_loss"] + weight * t["disc_loss"]
        return loss, {k: t[k] for k in ("mlm_loss", "mlm_accuracy", "disc_loss", "disc_accuracy",
                                         "replaced_fraction")}

    return loss_fn


@functools.partial(nnx.jit, static_argnames=("options",))
def _eval_sums(model, batch, keys, options):
    """Sums over one evaluation batch (losses and hits times their counts, and the counts);
    ``options``: the masking options as sorted ``(name, value)`` pairs (static, so evaluation
    functions with the same options share one compilation)."""
    t = electra_terms(model, batch, keys[0], keys[1], **dict(options))
    s, m = t["num_selected"], t["num_tokens"]
    return {"mlm_loss": t["mlm_loss"] * s, "mlm_accuracy": t["mlm_accuracy"] * s, "selected": s,
            "disc_loss": t["disc_loss"] * m, "disc_accuracy": t["disc_accuracy"] * m,
            "replaced_fraction": t["replaced_fraction"] * m, "tokens": m}


def eval_keys(seed: int, index: int):
    """The fixed (masking, sampling) keys of evaluation batch ``index``."""
    return jax.random.split(jax.random.fold_in(jax.random.key(int(seed)), int(index)))


def electra_eval_fn(blocks, batch_size: int, *, vocab_size: int, mask_id: int, special_ids: Sequence[int],
                    seed: int = 0, rate: float = 0.15, mask_prob: float = ELECTRA_MASK_PROB,
                    random_prob: float = ELECTRA_RANDOM_PROB, pad_id: int = 0):
    """``eval_fn(model) -> dict`` on held-out ``blocks`` (int [N, T], every token real) for
    `efficient_nlp.train.fit`: ``mlm_loss`` and ``mlm_accuracy`` (per selected token),
    ``disc_loss``, ``disc_accuracy`` and ``replaced_fraction`` (per real token), without dropout.

    The masking and the generator's samples use keys fixed by ``seed`` and the batch index
    (`eval_keys`), the same at every call, so successive evaluations differ only by the model.
    The last batch is filled up with ``pad_id`` rows of attention mask 0, which count nowhere.
    """
    options = _checked_options(vocab_size, mask_id, special_ids, rate, mask_prob, random_prob)
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer) or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty integer array [N, block_size], got {blocks.dtype} "
                         f"{blocks.shape}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, length = blocks.shape
    num_batches = -(-n // batch_size)
    ids = np.full((num_batches * batch_size, length), pad_id, np.int32)
    ids[:n] = blocks
    mask = np.zeros_like(ids)
    mask[:n] = 1
    keys = [eval_keys(seed, i) for i in range(num_batches)]

    def eval_fn(model) -> dict:
        total: dict = {}
        for i, k in enumerate(keys):
            rows = slice(i * batch_size, (i + 1) * batch_size)
            batch = {"input_ids": ids[rows], "attention_mask": mask[rows]}
            out = jax.device_get(_eval_sums(model, batch, k, tuple(sorted(options.items()))))
            for name, value in out.items():
                total[name] = total.get(name, 0.0) + float(value)
        selected, tokens = max(total.pop("selected"), 1.0), max(total.pop("tokens"), 1.0)
        return {name: value / (selected if name.startswith("mlm") else tokens) for name, value in total.items()}

    return eval_fn


__all__ = [
    "ELECTRA_MASK_PROB", "ELECTRA_RANDOM_PROB", "ElectraPretrainer", "SHARED_EMBEDDINGS", "discriminator_of",
    "electra_eval_fn", "electra_loss_fn", "electra_terms", "eval_keys", "generator_config", "gumbel_max_sample",
    "replaced_labels", "replaced_token_loss",
]
