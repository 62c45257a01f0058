"""Training memory of QLoRA against LoRA on the float base and full fine-tuning, on MiniLM-L6-H384.

    python benchmarks/qlora_memory.py [--batch 8] [--seq 128] [--rank 8]

One AdamW update of sequence classification (dropout on) per variant, compiled, not run
(`efficient_nlp.train.step_memory`):

* full fine-tuning: every parameter trains (float32 parameters + Adam's two moments);
* LoRA: rank ``--rank`` on every Linear of the layer stack, base frozen in float32;
* QLoRA: the same LoRA on the layer stack packed in NF4 (blocks of 64, double-quantized scales);
  the embeddings and the head stay float32 in both LoRA variants, and the head trains.

Columns: the state the loop carries (trainable parameters + optimizer state + frozen rest, from
the arrays themselves) and XLA's plan of the compiled step (``Compiled.memory_analysis()``:
``argument_size_in_bytes``, ``temp_size_in_bytes`` and the peak = arguments + outputs + temporaries
- aliased (donated) buffers).  The CPU backend reports these fields, as do GPU and TPU; they are
the compiler's plan, the same on every run, not the process's resident memory.  The last line
checks that QLoRA's backward pass recomputes each layer's kernel instead of keeping all of them:
its temporaries exceed LoRA's by far less than the float kernels' bytes.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MB = 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import jax
    import optax
    from flax import nnx

    from _common import random_batch
    from efficient_nlp import models, train
    from efficient_nlp.models import family as F
    from efficient_nlp.peft import lora, qlora
    from efficient_nlp.recipes.finetune import task_loss

    start = time.time()
    model = models.from_pretrained(models.default_model_dir(), num_labels=2)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq)
    packed, report = qlora.quantize_base(model)
    variants = {"full fine-tuning": (model, nnx.Param)}
    for name, base in (("LoRA (float base)", model), ("QLoRA (NF4 base)", packed)):
        wrapped, _ = lora.add_lora(base, roles=tuple(F.family_of(model).layer_sites), rank=args.rank,
                                   alpha=2.0 * args.rank)
        variants[name] = (wrapped, lora.trainable(wrapped))
    optimizer = optax.adamw(1e-4)
    rows = {name: train.step_memory(m, task_loss, optimizer, batch, trainable=t) for name, (m, t) in variants.items()}

    print(f"MiniLM-L6-H384, batch {args.batch} x {args.seq}, AdamW, {jax.default_backend()} backend; "
          f"LoRA r={args.rank} on all {len(report.sites)} layer Linears")
    print(report)
    head = f"{'':<20}{'trainable':>11}{'state MB':>10}{'(frozen)':>10}{'args MB':>9}{'temp MB':>9}{'peak MB':>9}"
    print(head + f"{'state / full':>14}{'peak / full':>13}")
    full = rows["full fine-tuning"]
    full_state = full["trainable_bytes"] + full["optimizer_bytes"] + full["frozen_bytes"]
    for name, r in rows.items():
        state = r["trainable_bytes"] + r["optimizer_bytes"] + r["frozen_bytes"]
        print(f"{name:<20}{r['trainable_params']:>11,}{state / MB:>10.1f}{r['frozen_bytes'] / MB:>10.1f}"
              f"{r['argument_bytes'] / MB:>9.1f}{r['temp_bytes'] / MB:>9.1f}{r['peak_bytes'] / MB:>9.1f}"
              f"{state / full_state:>14.3f}{r['peak_bytes'] / full['peak_bytes']:>13.3f}")
    extra = rows["QLoRA (NF4 base)"]["temp_bytes"] - rows["LoRA (float base)"]["temp_bytes"]
    largest = max(F.get_module(model, p).kernel.size for p in report.sites) * 4
    print(f"QLoRA temporaries - LoRA temporaries: {extra / MB:.1f} MB (the float kernels of all layers: "
          f"{report.float_bytes / MB:.1f} MB, the largest one: {largest / MB:.1f} MB)")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
