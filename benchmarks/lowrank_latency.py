"""CPU latency of MiniLM with every attention and FFN Linear factorised by truncated SVD.

    python benchmarks/lowrank_latency.py [--model_dir DIR] [--ranks 64,128] [--seq_len 128]
                                         [--batch_sizes 8,1] [--repeats 10]

Each rank is applied to every q, k, v, o, ffn_in and ffn_out Linear (`lowrank.factorize`; a
rank above a site's break-even keeps it dense).  The dense model and the factorised ones are
timed side by side (`train.compare_latency`: jitted forward, alternating rounds, median) at
each batch size.  Printed per rank: the parameter ratio of the whole model, the measured
speed-up and the one the FLOPs predict (`models.flops.forward_flops` of the dense model, minus
``2 t (d_in d_out - r (d_in + d_out))`` per factorised Linear, ``t`` tokens per sequence).
Default model: the embedded MiniLM-L6-H384 (a random model of its shape when not installed).
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from efficient_nlp import lowrank, train  # noqa: E402
from efficient_nlp.models.flops import forward_flops  # noqa: E402
from efficient_nlp.prune import count_params  # noqa: E402

from _common import minilm  # noqa: E402

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")


def log(msg, start=[time.perf_counter()]):  # noqa: B006 - the start time of the run
    print(f"[{time.perf_counter() - start[0]:6.1f}s] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--ranks", default="64,128")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch_sizes", default="8,1")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    model, source = minilm(args.model_dir)
    log(f"{source}: {count_params(model) / 1e6:.2f}M parameters; {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores")
    t = args.seq_len
    dense_flops = forward_flops(model, t)
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        small, report = lowrank.factorize(model, roles=ROLES, rank=rank)
        saved = sum(2 * t * (r.d_in * r.d_out - r.rank * (r.d_in + r.d_out)) for r in report.rows if r.rank != "dense")
        rows.append((rank, small, count_params(small) / count_params(model), dense_flops / (dense_flops - saved)))
        log(str(report).splitlines()[0])
    speedups = {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        log(f"timing batch {b} x {t} (dense + {len(rows)} factorised, {args.repeats} calls x 3 rounds each)")
        batch = train.token_batch(model.config.vocab_size, b, t)
        times = train.compare_latency([model] + [r[1] for r in rows], batch, repeats=args.repeats, warmup=2,
                                      rounds=3)
        log(f"batch {b}: dense {times[0] * 1e3:.1f} ms, " + ", ".join(
            f"rank {r[0]} {s * 1e3:.1f} ms" for r, s in zip(rows, times[1:])))
        speedups[b] = [times[0] / s for s in times[1:]]
    sizes = list(speedups)
    print(f"\n{'rank':>5}  {'params':>7}  " + "  ".join(f"{'speed-up b=' + str(b):>13}" for b in sizes)
          + f"  {'FLOPs-predicted':>15}")
    for k, (rank, _, ratio, predicted) in enumerate(rows):
        print(f"{rank:>5}  {ratio:>6.2f}x  " + "  ".join(f"{speedups[b][k]:>12.2f}x" for b in sizes)
              + f"  {predicted:>14.2f}x")


if __name__ == "__main__":
    main()
