"""CPU latency of a BERT with 50% of its heads and 50% of its FFN neurons physically removed.

    python benchmarks/prune_shrink_latency.py [--model_dir DIR] [--fraction 0.5] [--seq_len 128]
                                              [--batch_size 8] [--repeats 30]

Masks: magnitude, the same fraction of heads (Q/K/V columns + O rows) and FFN neurons in every
layer; the masked model is shrunk with `prune.shrink`, checked to give the same logits, and both
are timed (`train.compare_latency`: jitted forward, alternating rounds, median).  Default model:
the embedded MiniLM-L6-H384 (falls back to a random model of the same shape when it is not
installed).  Goal: >= 1.6x.
"""
import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from efficient_nlp import prune, train  # noqa: E402

from _common import minilm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    model, source = minilm(args.model_dir)
    d = model.config.attention_head_dim
    rules = [prune.rule(r"attention\.(query|key|value)\.(kernel|bias)$|attention\.output\.kernel$", "heads",
                        args.fraction, "uniform", head_dim=d),
             prune.rule(r"ffn\.(intermediate\.(kernel|bias)|output\.kernel)$", "ffn_neurons", args.fraction,
                        "uniform")]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masked = nnx.merge(graphdef, prune.apply_masks(params, prune.make_masks(params, rules)), rest)
    small, _ = prune.shrink(masked)
    ids = np.random.default_rng(0).integers(1, 1000, (2, 32)).astype(np.int32)
    diff = float(np.abs(np.asarray(masked(ids).logits) - np.asarray(small(ids).logits)).max())
    rep = prune.shrink_report(masked, small, seq_len=args.seq_len, measure=False)
    batch = train.token_batch(model.config.vocab_size, args.batch_size, args.seq_len)
    rep.latency_before_s, rep.latency_after_s = train.compare_latency(
        [masked, small], batch, repeats=max(args.repeats // 3, 1), warmup=3, rounds=3)
    print(f"{source}: {args.fraction:.0%} heads + {args.fraction:.0%} FFN neurons removed; "
          f"batch {args.batch_size} x {args.seq_len} tokens, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cores")
    print(f"max |logits(shrunk) - logits(masked)| = {diff:.2e}")
    print(rep.format())


if __name__ == "__main__":
    main()
