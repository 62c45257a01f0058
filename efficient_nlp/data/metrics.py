"""GLUE metrics in plain numpy: accuracy, binary F1, Matthews correlation, Pearson, Spearman.

Conventions: a correlation whose value is undefined (a constant input, no samples) is 0.0, as
scikit-learn does for the Matthews correlation; F1 with no true and no predicted positive is 0.0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "compute_metrics",
]


def _pair(predictions, labels):
    p = np.asarray(predictions).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    return p, y


def accuracy(predictions, labels) -> float:
    """Fraction of predicted class ids equal to the labels."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y)) if p.size else 0.0


def f1_binary(predictions, labels, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 tp / (2 tp + fp + fn)."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin's R_K); binary MCC for 2 classes."""
    p, y = _pair(predictions, labels)
    if p.size == 0:
        return 0.0
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    yi, pi = inv[: y.size], inv[y.size :]
    k = classes.size
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t = conf.sum(axis=1)  # true counts per class
    q = conf.sum(axis=0)  # predicted counts per class
    c = np.trace(conf)
    s = conf.sum()
    cov_yp = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_yy = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(x, y) -> float:
    """Pearson correlation coefficient (0.0 when either input is constant)."""
    a, b = _pair(x, y)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.size < 2:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    if denom == 0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip((a @ b) / denom, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """Ranks starting at 1; tied values get the average of the ranks they span."""
    x = np.asarray(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    new_run = np.concatenate([[True], xs[1:] != xs[:-1]]) if xs.size else np.zeros(0, bool)
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [xs.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_id = np.cumsum(new_run) - 1
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of average ranks."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def compute_metrics(spec, predictions, labels, weights=None) -> dict[str, float]:
    """The metrics named by ``spec.metrics``.

    Args:
      spec: a TaskSpec (needs ``num_labels`` and ``metrics``).
      predictions: logits [N, C] (class = argmax) or, for classification, class ids [N];
        scores [N] (or [N, 1]) for regression.
      labels: [N] class ids or regression targets.
      weights: optional [N]; rows with weight 0 (padding from ``eval_batches``) are left out,
        the others count once.
    """
    if getattr(spec, "kind", None) == "causal_lm":
        from efficient_nlp.data.lm_task import lm_metrics

        return lm_metrics(predictions, labels, weights)
    pred = np.asarray(predictions)
    y = np.asarray(labels).reshape(-1)
    if spec.num_labels == 1:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.ndim != 1:
            raise ValueError(f"regression predictions must have shape [N] or [N, 1], got {pred.shape}")
        pred = pred.astype(np.float64)
    else:
        if pred.ndim == 2:
            pred = np.argmax(pred, axis=-1)
        elif pred.ndim != 1:
            raise ValueError(f"classification predictions must be logits [N, C] or class ids [N], got {pred.shape}")
        elif np.issubdtype(pred.dtype, np.floating) and not np.all(pred == np.round(pred)):
            raise ValueError("1-d classification predictions must be class ids; pass logits as [N, C]")
        pred = pred.astype(np.int64)
        y = y.astype(np.int64)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {pred.shape[0]} vs {y.shape[0]}")
    if weights is not None:
        w = np.asarray(weights).reshape(-1)
        if w.shape[0] != y.shape[0]:
            raise ValueError(f"weights and labels differ in length: {w.shape[0]} vs {y.shape[0]}")
        keep = w > 0
        pred, y = pred[keep], y[keep]
    fns = {
        "accuracy": accuracy,
        "f1": f1_binary,
        "mcc": matthews_corrcoef,
        "pearson": pearson,
        "spearman": spearman,
    }
    out = {}
    for name in spec.metrics:
        if name not in fns:
            raise ValueError(f"unknown metric {name!r}; known: {sorted(fns)}")
        out[name] = fns[name](pred, y)
    return out
