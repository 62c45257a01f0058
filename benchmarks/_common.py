"""Shared pieces of the benchmark scripts: the model they time and a synthetic BERT batch (timing:
`efficient_nlp.train.compare_latency`)."""
import numpy as np
from flax import nnx

from efficient_nlp import models


def minilm(model_dir=""):
    """``(model, source)``: the sequence classifier (2 labels) of ``model_dir``, default the embedded
    MiniLM-L6-H384, or a random model of its shape when that package is not installed."""
    try:
        return (models.from_pretrained(model_dir or models.default_model_dir(), num_labels=2),
                model_dir or "embedded MiniLM-L6-H384")
    except ModuleNotFoundError:
        cfg = models.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=1536, num_labels=2)
        return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), "random MiniLM-L6-H384-shaped model"


def random_batch(vocab_size, batch, seq, seed=0, low=1000):
    """Random token ids in ``[low, vocab_size)`` (above the special tokens), half the rows padded
    to half length, binary labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[: batch // 2, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}
