"""Measuring a dynamic method: accuracy against work done and against measured wall time.

A dynamic method counts only when the wall-clock time really falls, so every operating point of
a sweep carries two kinds of numbers: what the method decided (mean layers run, mean tokens kept,
dev accuracy: from one offline pass) and what a clock measured (seconds per example of the real
runner against the full jitted model on the same inputs, at batch 1 and batched).

    batches = timing_batches(task.dev, n=64, batch_size=1)
    secs = time_side_by_side({"full": full_model_fn(model), "exit": runner}, batches)
    points = operating_points(sweep, targets=(1.5, 2.0))
    plot_sweep(sweep, "sweep.png", work="mean layers run")
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.dynamic.buckets import bucket, length_buckets
from efficient_nlp.dynamic.segments import compile_segments
from efficient_nlp.models import family as F

#: Arrays of a tokenised batch the model reads (labels and weights are not passed to the runners).
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def trim(batch: Mapping, step: int = 8) -> dict:
    """``batch``'s model inputs cut to the length bucket (a multiple of ``step``) of its longest
    real row: trailing padding that no row needs is not computed, by the full model or a runner."""
    mask = np.asarray(batch["attention_mask"])
    longest = int(mask.sum(axis=1).max()) if mask.size else 1
    length = bucket(max(longest, 1), length_buckets(mask.shape[1], step))
    return {k: np.asarray(batch[k])[:, :length] for k in INPUT_KEYS if k in batch}


def timing_batches(arrays: Mapping, n: int, batch_size: int, *, step: int = 8) -> list[dict]:
    """The first ``n`` examples of a split as trimmed batches of ``batch_size`` (the last one
    smaller when ``batch_size`` does not divide ``n``)."""
    n = min(int(n), len(arrays["input_ids"]))
    if n < 1 or batch_size < 1:
        raise ValueError(f"need at least one example and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return [trim({k: np.asarray(arrays[k])[lo:lo + batch_size] for k in INPUT_KEYS if k in arrays}, step)
            for lo in range(0, n, batch_size)]


def _whole(model, s, inputs):
    ids, types, mask = inputs
    return F.forward(model, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}).logits


def _no_chain(out_shape, first_inputs):  # pragma: no cover - one segment only
    return first_inputs


def full_model_fn(model) -> Callable[[Mapping], np.ndarray]:
    """``fn(batch) -> logits`` (numpy): the whole model as one jitted call that receives its
    parameters as a flat tuple (`efficient_nlp.dynamic.segments`, as the runners do, so the
    reference pays no more per-call overhead than they do); the model every runner is timed
    against."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    (whole,) = compile_segments(model, _whole, 1, (ids, ids, ids), _no_chain)

    def run(batch):
        ids = np.asarray(batch["input_ids"], np.int32)
        types = batch.get("token_type_ids")
        types = np.zeros_like(ids) if types is None else np.asarray(types, np.int32)
        return np.asarray(whole(ids, types, np.asarray(batch["attention_mask"], np.int32)))

    return run


def time_side_by_side(candidates: Mapping[str, Callable], batches: Sequence[Mapping], *,
                      rounds: int = 3) -> dict[str, float]:
    """Median seconds per example of each candidate ``fn(batch)`` over ``batches``.

    Every candidate first runs all batches once untimed (compilation of every shape and bucket);
    then, ``rounds`` times, each runs all batches in turn (alternating, so drifts in machine load
    hit them alike).  A candidate's result must be on the host when it returns (numpy arrays)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    examples = sum(len(b["input_ids"]) for b in batches)
    for fn in candidates.values():
        for b in batches:
            jax.block_until_ready(fn(b))
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for b in batches:
                jax.block_until_ready(fn(b))
            times[name].append((time.perf_counter() - start) / examples)
    return {name: float(np.median(t)) for name, t in times.items()}


def measured_speedups(full: Callable, runner: Callable, b1: Sequence[Mapping], batched: Sequence[Mapping], *,
                      rounds: int = 3) -> dict[str, float]:
    """`time_side_by_side` of the full model and a runner at batch 1 and batched: milliseconds per
    example (``full_ms_b1``, ``dynamic_ms_b1``, ``full_ms_batched``, ``dynamic_ms_batched``) and the
    speed-ups full / runner (``speedup_b1``, ``speedup_batched``)."""
    out = {}
    for suffix, batches in (("b1", b1), ("batched", batched)):
        t = time_side_by_side({"full": full, "dynamic": runner}, batches, rounds=rounds)
        out.update({f"full_ms_{suffix}": 1e3 * t["full"], f"dynamic_ms_{suffix}": 1e3 * t["dynamic"],
                    f"speedup_{suffix}": t["full"] / t["dynamic"]})
    return out


def operating_points(points: Sequence[Mapping], targets=(1.5, 2.0), key: str = "speedup_b1", *,
                     full_accuracy: float | None = None, tolerance: float = 0.01) -> dict[str, dict]:
    """For each target speed-up, the sweep point whose measured ``key`` is closest to it (ties: the
    more accurate); with ``full_accuracy``, also ``"within <tolerance>"``: the fastest point whose
    accuracy is at most ``tolerance`` below the full model's (absent when none is)."""
    if not points:
        raise ValueError("the sweep has no points")
    out = {}
    for t in targets:
        out[f"{t:g}x"] = min(points, key=lambda p: (abs(p[key] - t), -p["accuracy"]))
    if full_accuracy is not None:
        good = [p for p in points if p["accuracy"] >= full_accuracy - tolerance - 1e-12]
        if good:
            out[f"within {tolerance:g}"] = max(good, key=lambda p: p[key])
    return out


def plot_sweep(points: Sequence[Mapping], path: str, *, work: str, work_key: str, full_accuracy: float,
               title: str) -> str:
    """Two panels: dev accuracy against ``work`` (mean layers run / tokens kept) and against the
    measured speed-up at batch 1 and batched; the full model's accuracy as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    acc = [p["accuracy"] for p in points]
    left.plot([p[work_key] for p in points], acc, "o-")
    left.set_xlabel(work)
    left.set_ylabel("dev accuracy")
    for key, label in (("speedup_b1", "batch 1"), ("speedup_batched", "batched")):
        if all(key in p for p in points):
            right.plot([p[key] for p in points], acc, "o-", label=label)
    right.axvline(1.0, color="grey", lw=0.8)
    right.set_xlabel("measured speed-up over the full model")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.axhline(full_accuracy, color="k", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["INPUT_KEYS", "full_model_fn", "measured_speedups", "operating_points", "plot_sweep", "time_side_by_side",
           "timing_batches", "trim"]
