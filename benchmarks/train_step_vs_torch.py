"""Training-step time: our MiniLM fine-tuning step (or decoder causal-LM step) vs transformers' PyTorch model.

Both sides fine-tune the same checkpoint (the embedded MiniLM-L6-H384 unless
``--model_dir``) for sequence classification with AdamW (weight decay 0.01, grad clip
1.0, dropout on), on the same CPU, batch and sequence length, in one run. The two
alternate in blocks (a warm-up step, then timed steps; ours, torch, ours, ...) so that
drifts in machine load hit both alike, while each block runs alone (torch's OpenMP
threads keep spinning for a while after a step and would slow a step of ours that
follows immediately); prints the median milliseconds per step of each and the ratio torch / ours
(> 1: ours faster).

    python benchmarks/train_step_vs_torch.py --batch 32 --seq 128 --steps 4 --rounds 3

``--decoder``: the causal-LM training step of our pre-trained decoder
(``models.default_decoder_dir()``, or ``--model_dir``) vs transformers' ``AutoModelForCausalLM``
on the same checkpoint (next-token loss, same optimizer settings); also prints tokens/s.

``--hugetlb``: runs the process (both sides) with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(glibc >= 2.35), so that large allocations are backed by transparent huge pages. XLA:CPU
allocates a step's temporaries (hundreds of MB for MiniLM at batch 16 x 128) anew on every
call and glibc maps them fresh, so each step page-faults them in 4 KiB pages (~200k faults
per step); PyTorch's step faults less (its allocations are smaller) but also gains.
"""
import argparse
import os
import sys

from _common import random_batch


def ours(model_dir, batch, decoder=False):
    import ml_collections
    from efficient_nlp import models, train
    from efficient_nlp.recipes.finetune import task_loss

    model = models.from_pretrained(model_dir) if decoder else models.from_pretrained(model_dir, num_labels=2)
    config = ml_collections.ConfigDict({"train": train.default_train_config()})
    step = train.make_step_runner(model, task_loss, config=config)
    return lambda: step(batch)  # blocks until the step is done (returns the loss)


def torch_side(model_dir, batch, decoder=False):
    import torch
    import transformers

    if decoder:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    tb = {k: torch.as_tensor(v).long() for k, v in batch.items()}

    def step():
        optimizer.zero_grad()
        if decoder:  # next-token loss over the valid tokens, as ours
            labels = tb["input_ids"].masked_fill(tb["attention_mask"] == 0, -100)
            loss = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"], labels=labels).loss
        else:
            loss = model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                         token_type_ids=tb["token_type_ids"], labels=tb["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, torch.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decoder", action="store_true", help="the causal-LM step of a decoder")
    parser.add_argument("--hugetlb", action="store_true",
                        help="run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (huge pages for large allocations)")
    args = parser.parse_args()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.hugetlb and "glibc.malloc.hugetlb" not in tunables:  # read at process start: run again
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"])))
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    from efficient_nlp import models

    model_dir = args.model_dir or (models.default_decoder_dir() if args.decoder else models.default_model_dir())
    vocab = models.config_from_pretrained(model_dir).vocab_size
    batch = random_batch(vocab, args.batch, args.seq, low=min(1000, vocab // 4))
    ours_step = ours(model_dir, batch, args.decoder)
    torch_step, threads = torch_side(model_dir, batch, args.decoder)
    from efficient_nlp import train
    ours_ms, torch_ms = (1e3 * s for s in train.compare_latency(
        [ours_step, torch_step], repeats=args.steps, warmup=args.warmup, rounds=args.rounds, settle=True))
    import jax
    what = "decoder causal-LM training step" if args.decoder else "MiniLM fine-tuning step"
    print(f"{what} ({model_dir}), batch {args.batch} x seq {args.seq}, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch threads {threads}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"{'ours (jax)':<14}{ours_ms:>10.1f} ms/step")
    print(f"{'torch':<14}{torch_ms:>10.1f} ms/step")
    print(f"ratio torch/ours: {torch_ms / ours_ms:.2f}x (> 1 means ours is faster)")
    tokens = int(batch["attention_mask"].sum())
    print(f"tokens/s (valid tokens per step {tokens}): ours {tokens / ours_ms * 1e3:,.0f}, "
          f"torch {tokens / torch_ms * 1e3:,.0f}")


if __name__ == "__main__":
    main()
