"""Global top-k mask over a MiniLM's encoder kernels: selection (ours) vs a stable argsort.

    python benchmarks/prune_topk.py [--n 14155776] [--sparsity 0.9] [--rounds 3]

`efficient_nlp.prune.topk_mask` finds the k-th smallest score by bisection over the bits of an
order-preserving integer key (32 counting passes) instead of ranking every score with a stable
argsort (the previous implementation, kept here as the reference).  Both are jitted with a
traced k, as inside the pruning wrapper's `lax.cond`; the masks are checked to be identical,
then timed in alternating rounds (median).  Default n: the 36 attention / FFN kernels of
MiniLM-L6-H384 (10,616,832 weights), the global ranking of `configs/prune_*.py`.
"""
import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from efficient_nlp import prune, train  # noqa: E402


def argsort_topk_mask(scores, k):
    """The reference: ranks from a stable argsort, the k lowest removed."""
    order = jnp.argsort(scores, stable=True)
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return ranks >= jnp.clip(k, 0, scores.shape[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6 * (4 * 384 * 384 + 2 * 384 * 1536))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    scores = jnp.asarray(np.random.default_rng(0).normal(size=args.n).astype(np.float32))
    k = jnp.int32(round(args.sparsity * args.n))
    ours, ref = jax.jit(prune.topk_mask), jax.jit(argsort_topk_mask)
    same = bool(jnp.all(ours(scores, k) == ref(scores, k)))
    ms_ours, ms_ref = (1e3 * s for s in train.compare_latency([ours, ref], (scores, k), repeats=1, warmup=1,
                                                               rounds=args.rounds))
    print(f"{args.n:,} scores, k = {int(k):,}, {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"identical masks: {same}")
    print(f"stable argsort: {ms_ref:9.1f} ms")
    print(f"selection     : {ms_ours:9.1f} ms   ({ms_ref / ms_ours:.1f}x faster)")


if __name__ == "__main__":
    main()
