"""Peak memory of the one-shot pass (GPTQ, layer after layer) against capturing every layer's
Linear inputs at once, on MiniLM-L6-H384 with a calibration set of N sequences of T tokens.

    python benchmarks/oneshot_memory.py [--rows 128] [--seq 128] [--group 128]

Each side runs in its own fresh process (so one's high-water mark cannot hide the other's) and
reports the growth of the process's resident set size over its state after loading the model
and the calibration set (`efficient_nlp.recipes.ptq.PeakMemory`, sampled every 20 ms), next to
the bytes of activations each keeps: the pass holds one layer boundary of hidden states
``[N, T, H]`` (its input and output) and one ``[d_in, d_in]`` input Gram matrix; the whole-model
capture holds the input of every site group of every layer (``q/k/v``, ``o``, ``ffn_in``,
``ffn_out``: ``N * T * (3H + I)`` floats per layer), what a tool that calibrates from one
forward pass with hooks keeps.
"""
import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _setup(rows, seq):
    import numpy as np
    from efficient_nlp import models

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import random_batch

    model = models.from_pretrained(models.default_model_dir(), num_labels=2)
    calib = random_batch(model.config.vocab_size, rows, seq)
    calib = {k: calib[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    calib["attention_mask"] = np.ones_like(calib["attention_mask"])
    return model, calib


def _part(name, rows, seq, group):
    """Runs one side in this process; prints a JSON line."""
    import jax
    import numpy as np
    from efficient_nlp import oneshot, quant
    from efficient_nlp.models import family as F
    from efficient_nlp.quant.ptq import run_probe
    from efficient_nlp.recipes.ptq import PeakMemory

    model, calib = _setup(rows, seq)
    if name == "pass":
        qmodel, _ = quant.quantize_model(model, quant.make_spec(4, 32, 16, weight_method="lsq",
                                                                weight_group_size=group))
        with PeakMemory() as memory:
            result = oneshot.quantize(qmodel, calib, method="gptq", log=None)
        held = result.info["held"]
        kept = 2 * int(np.prod(held["hidden"])) * 4 + max(d * d for d, _ in held["stats"]) * 4
    else:
        sources = tuple(sorted({F.site_input(model, s.role) for s in F.sites(model)} - {"hidden_states"}))

        def capture(m, batch):
            h = F.embed(m, batch)
            _, inter = F.run_layers(m, h, batch["attention_mask"], capture=sources)
            return {"hidden_states": h, **{k: jax.numpy.stack(v, axis=1) for k, v in inter.items()}}

        with PeakMemory() as memory:
            acts = run_probe(model, _Capture(capture), calib, batch_size=32)
        kept = sum(int(np.prod(a.shape)) * 4 for a in acts.values())
        kept += int(np.prod(acts["hidden_states"].shape)) * 4 * (F.num_layers(model) - 1)   # every layer's input
    s = memory.summary()
    print(json.dumps({"part": name, "rss_growth_mb": (s["rss_peak_mb"] - s["rss_start_mb"]),
                      "activations_mb": kept / 2**20}))


class _Capture:
    """A hashable probe wrapping ``fn`` (run_probe compiles once per probe)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, model, batch):
        return self.fn(model, batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--part", choices=("pass", "capture"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        _part(args.part, args.rows, args.seq, args.group)
        return
    out = {}
    for part in ("pass", "capture"):
        run = subprocess.run([sys.executable, __file__, "--part", part, "--rows", str(args.rows), "--seq",
                              str(args.seq), "--group", str(args.group)], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"the {part} side failed:\n{run.stderr[-3000:]}")
        out[part] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"MiniLM-L6-H384, calibration {args.rows} x {args.seq} tokens, GPTQ W4 g{args.group}")
    print(f"{'':<34}{'RSS growth MB':>14}{'activations MB':>16}")
    for part, title in (("pass", "one-shot pass (one layer boundary)"), ("capture", "whole-model capture")):
        print(f"{title:<34}{out[part]['rss_growth_mb']:>14.0f}{out[part]['activations_mb']:>16.0f}")
    print(f"ratio capture / pass: RSS growth {out['capture']['rss_growth_mb'] / max(out['pass']['rss_growth_mb'], 1):.1f}x, "
          f"activations {out['capture']['activations_mb'] / out['pass']['activations_mb']:.1f}x")


if __name__ == "__main__":
    main()
