"""Tiny random BERTs and token batches shared by the quantization tests (not a test module)."""
import jax
import numpy as np
from flax import nnx

from efficient_nlp import models
from efficient_nlp.models import family as F


def tiny_bert(seed=0, *, vocab=50, hidden=16, layers=2, heads=2, intermediate=24, labels=3, positions=16,
              noise=0.05):
    """A sequence classifier without dropout whose weights get ``noise`` * N(0, 1) added, so that
    quantization is not trivially tiny."""
    cfg = models.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=intermediate, num_labels=labels,
                            max_position_embeddings=positions, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    model = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + noise * jax.random.normal(next(keys), x.shape), params))
    return model


def token_batch(b, length, vocab, seed=0):
    """Random ids in [1, vocab) with the second row padded after position 5."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((b, length), np.int32)}


def tiny_decoder(kind="llama", *, vocab=61, layers=2, seed=0, heads=4, kv_heads=2, hidden=16, intermediate=24,
                 positions=40, noise=0.1):
    """A tiny causal LM with ``noise`` * N(0, 1) added to its weights: ``llama`` (RMSNorm, rotary,
    SwiGLU, ``kv_heads`` key/value heads, untied head) or ``gpt2`` (LayerNorm, learned positions,
    GELU, biases, tied head)."""
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=intermediate, max_position_embeddings=positions)
    if kind == "gpt2":
        kw.update(model_type="gpt2", norm_type="layernorm", position_type="learned", gated_ffn=False,
                  hidden_act="gelu_new", qkv_bias=True, o_bias=True, ffn_bias=True, tie_word_embeddings=True)
    else:
        kw.update(num_key_value_heads=kv_heads)
    model = models.DecoderForCausalLM(models.DecoderConfig(**kw), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + noise * jax.random.normal(next(keys), x.shape), params))
    return model


def lm_batch(n, length, vocab, seed=0):
    """Random ids in [2, vocab) for a causal LM, the second row padded after position 6."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@nnx.jit
def logits(model, batch):
    """The logits of any family's model on a batch dict (jitted once per model structure)."""
    return F.forward(model, batch).logits
