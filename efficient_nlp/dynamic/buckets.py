"""Fixed shape buckets for dynamic inference: a shrinking batch (early exit) or a shrinking
sequence (token skipping) is padded up to the next bucket, so each jitted layer compiles once
per bucket instead of once per size.
"""
from __future__ import annotations

from typing import Sequence


def batch_buckets(max_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_size``, then ``max_size`` itself: (1, 2, 4, ..., max_size)."""
    if int(max_size) < 1:
        raise ValueError(f"a bucket holds at least one row, got max_size={max_size}")
    sizes, n = [], 1
    while n < max_size:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (int(max_size),)


def length_buckets(max_len: int, step: int = 8) -> tuple[int, ...]:
    """Multiples of ``step`` below ``max_len``, then ``max_len``: (8, 16, ..., max_len)."""
    if int(max_len) < 1 or int(step) < 1:
        raise ValueError(f"need max_len >= 1 and step >= 1, got max_len={max_len}, step={step}")
    return tuple(range(step, int(max_len), step)) + (int(max_len),)


def bucket(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` (sizes ascending); ValueError when none does."""
    for size in sizes:
        if size >= n:
            return int(size)
    raise ValueError(f"{n} exceeds the largest bucket {max(sizes)}; buckets are {tuple(sizes)}")


__all__ = ["batch_buckets", "bucket", "length_buckets"]
