"""Per-layer time of the one-shot methods (RTN, GPTQ, AWQ, SparseGPT, Wanda) on random layers.

    python benchmarks/gptq_layer_time.py [--tokens 2048] [--bits 4] [--rounds 3] [--shapes 384x384,...]

For each kernel shape ``d_in x d_out`` (default: MiniLM-L6-H384's 384x384, 384x1536, 1536x384
and a small decoder's 256x256, 256x768, 768x256) the calibration inputs are ``--tokens``
correlated rows ``x = z @ A`` (z, A Gaussian), reduced once to the statistics the model pass
holds (`efficient_nlp.quant.rounding.hessian_update`, timed as "stats"); every method then runs on
those statistics.  Times are ms per layer, the median of ``--rounds`` single calls after one
untimed call (which compiles).  Errors are ``||X W' - X W||^2 / n`` ratios on the same
statistics: GPTQ / RTN (per channel and g128) at ``--bits``, AWQ (per channel, its chosen alpha)
/ RTN, AWQ's clipping search alone / RTN, and SparseGPT / Wanda at 50% unstructured sparsity.
g128 needs 128 | d_in.  These inputs have no outlier channels, so AWQ's scales gain little here.

On CPU the Cholesky factorisation and triangular solve run in LAPACK (OpenBLAS), whose own
threads oversubscribe a small machine shared with other work: a 384x384 Cholesky measured 1 ms
or 250 ms from one call to the next on 2 busy cores.  The script therefore defaults to
``OPENBLAS_NUM_THREADS=1`` (set it in the environment to override); XLA's matmuls are not
affected.
"""
import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from efficient_nlp import train  # noqa: E402
from efficient_nlp.prune import oneshot as P  # noqa: E402
from efficient_nlp.quant import rounding as G  # noqa: E402
from efficient_nlp.quant import smoothing as S  # noqa: E402

SHAPES = "384x384,384x1536,1536x384,256x256,256x768,768x256"


def layer(d_in, d_out, tokens, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, d_in)) @ rng.normal(size=(d_in, d_in)) / np.sqrt(d_in)
    w = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
    return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)


def methods(w, x, stats, bits):
    """``{name: no-argument callable}``; g128 entries only where 128 divides d_in."""
    g = 128 if w.shape[0] % 128 == 0 else None
    fns = {
        "stats": lambda: G.hessian_update(G.init_stats(w.shape[0]), x),
        "rtn": lambda: G.rtn(w, bits),
        "gptq": lambda: G.gptq(w, stats, bits),
        "gptq act": lambda: G.gptq(w, stats, bits, act_order=True),
        "gptq g128": lambda: G.gptq(w, stats, bits, g),
        "gptq g128 act": lambda: G.gptq(w, stats, bits, g, act_order=True),
        "awq": lambda: S.awq_scales(w, stats, bits),
        "awq clip": lambda: S.awq_clip(w, stats, bits),
        "sparsegpt": lambda: P.sparsegpt(w, stats, 0.5),
        "sparsegpt 2:4": lambda: P.sparsegpt(w, stats, None, (2, 4)),
        "wanda": lambda: P.wanda(w, stats, 0.5),
    }
    return {k: f for k, f in fns.items() if g or "g128" not in k}


def error_ratios(w, stats, bits):
    err = lambda new: float(G.layer_error(w, new, stats))   # noqa: E731
    rtn = err(G.rtn(w, bits)[0])
    out = {"gptq/rtn": err(G.gptq(w, stats, bits)[0]) / rtn}
    if w.shape[0] % 128 == 0:
        out["g128 gptq/rtn"] = err(G.gptq(w, stats, bits, 128)[0]) / err(G.rtn(w, bits, 128)[0])
    out["awq/rtn"] = float(jnp.min(S.awq_scales(w, stats, bits)[2])) / rtn
    out["clip/rtn"] = err(S.awq_clip(w, stats, bits)[0]) / rtn
    out["sparsegpt/wanda"] = err(P.sparsegpt(w, stats, 0.5).kernel) / err(P.wanda(w, stats, 0.5)[0])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated d_in x d_out kernel shapes")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows, ratios = [], []
    for d_in, d_out in shapes:
        w, x = layer(d_in, d_out, args.tokens)
        stats = jax.block_until_ready(G.hessian_update(G.init_stats(d_in), x))
        fns = methods(w, x, stats, args.bits)
        secs = train.compare_latency(list(fns.values()), (), repeats=1, warmup=1, rounds=args.rounds)
        rows.append({k: 1e3 * t for k, t in zip(fns, secs)})
        ratios.append(error_ratios(w, stats, args.bits))
    names = list(dict.fromkeys(k for r in sorted(rows, key=len, reverse=True) for k in r))
    print(f"ms per layer (median of {args.rounds}), {args.tokens} calibration tokens, W{args.bits}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores")
    print(f"{'method':16}" + "".join(f"{f'{a}x{b}':>11}" for a, b in shapes))
    for name in names:
        print(f"{name:16}" + "".join(f"{r[name]:>11.1f}" if name in r else f"{'-':>11}" for r in rows))
    print("layer error ratios (lower is better; < 1: the method beats its baseline)")
    for key in ("gptq/rtn", "g128 gptq/rtn", "awq/rtn", "clip/rtn", "sparsegpt/wanda"):
        print(f"{key:16}" + "".join(f"{r[key]:>11.3f}" if key in r else f"{'-':>11}" for r in ratios))


if __name__ == "__main__":
    main()
