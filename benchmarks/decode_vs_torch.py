"""Generation speed: our jitted prefill + decode loop vs transformers' PyTorch ``generate``.

Both sides run the same random-weight checkpoint (a Llama-style model of a few million
parameters with grouped-query attention, and a tiny GPT-2) greedily with a key/value cache on
the same CPU, same prompts (no padding) and the same number of new tokens (torch:
``min_new_tokens = max_new_tokens``; ours: no end-of-sequence id, so neither stops early).
They alternate in rounds (ours, torch, ours, ...) so that drifts in machine load hit both
alike.  Per model and batch size it prints the medians of

* prefill ms: the prompt pass (ours: with the first token's choice; torch: one forward with
  ``use_cache``, logits of the last position only);
* decode tokens/s: ``batch * (new - 1)`` tokens over the decode time (ours: the jitted decode
  loop alone; torch: the ``generate`` time minus its prefill);
* generate ms: one whole ``generate`` call, numpy / tensors in and out (the like-for-like total),

and the ratios (> 1: ours faster).  Compilation is excluded (one untimed run first).

    python benchmarks/decode_vs_torch.py --batch 1 8 --prompt 64 --new 64 --out decode.json
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

MODELS = {
    "llama": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(vocab_size=4096, n_embd=128, n_layer=4, n_head=4, n_positions=512),
}


def build(kind, directory):
    """A random-weight transformers model saved to ``directory``, and ours loaded from it."""
    import torch
    import transformers
    from efficient_nlp import models

    torch.manual_seed(0)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS[kind]))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODELS[kind]))
    hf.eval()
    hf.save_pretrained(directory)
    return hf, models.from_pretrained(directory)


def torch_speed(hf, ids, new_tokens, repeats):
    """Medians over ``repeats`` (after one untimed run) of transformers' prefill and generate."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long)
    mask = torch.ones_like(ids)

    def prefill():
        return hf(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

    def whole():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, use_cache=True, eos_token_id=0, pad_token_id=0)

    times = {"prefill": [], "generate": []}
    with torch.inference_mode():
        prefill(), whole()
        for _ in range(repeats):
            for name, fn in (("prefill", prefill), ("generate", whole)):
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
            assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens)
    prefill_s, generate_s = (float(np.median(times[k])) for k in ("prefill", "generate"))
    return {"prefill_ms": 1e3 * prefill_s, "generate_ms": 1e3 * generate_s,
            "decode_tokens_per_s": ids.shape[0] * (new_tokens - 1) / max(generate_s - prefill_s, 1e-9)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    import jax
    import torch
    from efficient_nlp.models.generate import decode_speed

    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.models:
        with tempfile.TemporaryDirectory() as directory:
            hf, ours_model = build(kind, directory)
        params = sum(p.numel() for p in hf.parameters())
        for batch in args.batch:
            ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, args.prompt))  # decode_speed's
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(decode_speed(ours_model, batch, args.prompt, args.new, repeats=args.repeats, seed=0))
                theirs.append(torch_speed(hf, ids, args.new, args.repeats))
            med = lambda runs, key: float(np.median([r[key] for r in runs]))
            row = {"model": kind, "params": params, "batch": batch, "prompt": args.prompt, "new": args.new}
            for key in ("prefill_ms", "decode_tokens_per_s", "generate_ms"):
                row[f"ours_{key}"], row[f"torch_{key}"] = med(ours, key), med(theirs, key)
            row["compile_s"] = ours[0]["compile_s"]
            rows.append(row)

    print(f"greedy generation, prompt {args.prompt} + {args.new} new tokens; jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; medians of {args.rounds} rounds x {args.repeats} runs")
    head = (f"{'model':<7}{'params':>8}{'batch':>6} | {'prefill ms':^22} | {'decode tokens/s':^22} | "
            f"{'generate ms':^22}")
    print(head)
    print(f"{'':<21} | " + " | ".join(f"{'ours':>6} {'torch':>7} {'ratio':>6}" for _ in range(3)))
    for r in rows:
        cells = []
        for key, faster_is_higher in (("prefill_ms", False), ("decode_tokens_per_s", True), ("generate_ms", False)):
            a, b = r[f"ours_{key}"], r[f"torch_{key}"]
            cells.append(f"{a:>6.1f} {b:>7.1f} {(a / b if faster_is_higher else b / a):>5.2f}x")
        print(f"{r['model']:<7}{r['params'] / 1e6:>7.1f}M{r['batch']:>6} | " + " | ".join(cells))
    print("ratio > 1: ours faster (torch ms / ours ms; ours tokens/s / torch tokens/s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                       "cores": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
