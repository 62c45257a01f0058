"""Shared pieces of the benchmark scripts: a synthetic BERT batch (timing: `efficient_nlp.train.compare_latency`)."""
import numpy as np


def random_batch(vocab_size, batch, seq, seed=0, low=1000):
    """Random token ids in ``[low, vocab_size)`` (above the special tokens), half the rows padded
    to half length, binary labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[: batch // 2, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}
