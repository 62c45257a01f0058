"""Shared pieces of the benchmark scripts: alternating timing and a synthetic BERT batch."""
import statistics
import time

import numpy as np


def time_alternating(fns, n_warmup, n_steps, n_rounds, settle=False):
    """Median ms per call of each callable in ``fns``, timed in alternating blocks so that both
    sides see the same machine load (warm-up calls first; ``settle``: one untimed call at the
    start of each block, after the other side's block)."""
    for fn in fns:
        for _ in range(n_warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(n_rounds):
        for fn, record in zip(fns, times):
            if settle:
                fn()
            for _ in range(n_steps):
                start = time.perf_counter()
                fn()
                record.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def random_batch(vocab_size, batch, seq, seed=0):
    """Random token ids (above the special tokens), half the rows padded to half length, binary labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, size=(batch, seq), dtype=np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[: batch // 2, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, 2, batch).astype(np.int32)}
