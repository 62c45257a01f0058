"""Small real image sets available offline, for the CNN experiments (cross distillation, APS).

``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), read from the copy
shipped inside the ``scikit-learn`` package (nothing is downloaded).  Pixels are scaled to
[0, 1]; the train/test split is stratified and seeded, so a seed names one split everywhere.
"""
from __future__ import annotations

import numpy as np


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """-> ``{"train": {"images", "labels"}, "test": {...}}``; images float32 [N,8,8,1] in [0,1],
    labels int32 [N].  Each class is split ``test_fraction`` / rest with a seeded permutation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the digits set is read from scikit-learn: pip install scikit-learn") from e
    raw = _sk_digits()
    images = (raw.images.astype(np.float32) / 16.0)[..., None]
    labels = raw.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.concatenate(test_idx)] = True
    return {
        "train": {"images": images[~test_mask], "labels": labels[~test_mask]},
        "test": {"images": images[test_mask], "labels": labels[test_mask]},
    }


def sample_k_per_class(labels: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Indices of exactly ``k`` examples of every class (seeded, sorted); a class with fewer than
    ``k`` examples is an error naming it."""
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than k={k}")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out))
