"""Quantization costs and gains on CPU, measured side by side in one run (MiniLM-L6-H384):

1. QAT train-step time / full-precision train-step time (the same task loss, AdamW, dropout on;
   the QAT model is fake-quantized W-E-A 2-2-8: TWN weights and row-wise TWN word embedding,
   8-bit activations).  Goal <= 1.3.
2. int8 inference throughput / float32 throughput (W8A8 `to_integer_model`: int8 x int8 -> int32
   ``dot_general`` for every Linear but the classifier), with the fake-quant W8A8 model for
   reference; checks that int8 and fake-quant predictions agree.  Goal >= 1.4.
3. Stored size ratio FP32 / packed for 8-, 4-, 2- and 1-bit weights and embeddings (real files:
   the float model as safetensors vs `save_packed`).

    python benchmarks/quant_speed.py [--model_dir DIR] [--batch 16] [--seq 128] [--infer_batch 8]
                                     [--steps 3] [--rounds 2]

Timings alternate between the two sides in blocks (warm-up first), median ms per call.
"""
import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from efficient_nlp import quant, train, tree  # noqa: E402
from efficient_nlp.recipes.finetune import task_loss  # noqa: E402

from _common import minilm, random_batch  # noqa: E402






def train_steps(model, batch, args):
    config = ml_collections.ConfigDict({"train": train.default_train_config()})
    fp = train.make_step_runner(model, task_loss, config=config)
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 2, 8))
    qat = train.make_step_runner(qmodel, task_loss, config=config)
    seconds = train.compare_latency([lambda: fp(batch), lambda: qat(batch)], repeats=args.steps, warmup=1,
                                    rounds=args.rounds)
    return [1e3 * s for s in seconds]


def inference(model, batch, args):
    @nnx.jit
    def fwd(m, ids, mask, types):
        return m(ids, mask, types).logits

    ids, mask, types = (batch[k][: args.infer_batch] for k in ("input_ids", "attention_mask", "token_type_ids"))
    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))
    imodel, report = quant.to_integer_model(qmodel)
    fake, integer = np.asarray(fwd(qmodel, ids, mask, types)), np.asarray(fwd(imodel, ids, mask, types))
    full = np.asarray(fwd(model, ids, mask, types))
    agree = float(np.mean(fake.argmax(-1) == integer.argmax(-1)))
    # int8 vs fake quant differ only where float rounding moves a value across a rounding
    # boundary of the next 8-bit activation grid; compare that with the quantization error itself.
    diff = (float(np.abs(integer - fake).mean()), float(np.abs(fake - full).mean()))
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    seconds = train.compare_latency([model, imodel, qmodel], inputs, repeats=args.infer_steps, warmup=2,
                                    rounds=args.rounds)
    return [1e3 * s for s in seconds], agree, diff, len(report.integer_sites)


def sizes(model):
    from safetensors.numpy import save_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = os.path.join(tmp, "fp32.safetensors")
        save_file({n: np.asarray(leaf, np.float32) for n, leaf in tree.named_leaves(nnx.state(model))}, fp_path)
        fp_mb = os.path.getsize(fp_path) / 2**20
        for bits in (8, 4, 2, 1):
            spec = quant.make_spec(bits, bits, 8)
            qmodel, _ = quant.quantize_model(model, spec)
            out = os.path.join(tmp, f"w{bits}")
            quant.save_packed(quant.export_packed(qmodel), out)
            rows.append((spec.bits, quant.packed_size_mb(out)))
    return fp_mb, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", default="")
    ap.add_argument("--batch", type=int, default=16, help="training batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--infer_batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per block")
    ap.add_argument("--infer_steps", type=int, default=5, help="timed forwards per block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: train,infer,size")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model, source = minilm(args.model_dir)
    batch = random_batch(model.config.vocab_size, max(args.batch, args.infer_batch), args.seq)
    print(f"{source}; jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
    if "train" not in skip:
        fp_ms, qat_ms = train_steps(model, {k: v[: args.batch] for k, v in batch.items()}, args)
        print(f"train step, batch {args.batch} x {args.seq}: full precision {fp_ms:.0f} ms, QAT 2-2-8 "
              f"{qat_ms:.0f} ms -> QAT / FP = {qat_ms / fp_ms:.2f} (goal <= 1.3)")
    if "infer" not in skip:
        (f32, i8, fq), agree, diff, n = inference(model, batch, args)
        print(f"inference, batch {args.infer_batch} x {args.seq}: float32 {f32:.1f} ms, int8 W8A8 {i8:.1f} ms "
              f"({n} int8 matmul sites), fake-quant W8A8 {fq:.1f} ms -> int8 / float32 throughput = "
              f"{f32 / i8:.2f} (goal >= 1.4)")
        print(f"  logits: mean |int8 - fake-quant| = {diff[0]:.1e} vs mean |fake-quant - float32| = {diff[1]:.1e}; "
              f"int8 / fake-quant argmax agree {agree:.0%} (random 2-way head: logits within a few 0.01)")
    if "size" not in skip:
        fp_mb, rows = sizes(model)
        print(f"stored size: fp32 safetensors {fp_mb:.2f} MB")
        for bits, mb in rows:
            print(f"  W-E-A {bits:>6}: packed {mb:6.2f} MB -> FP32 / packed = {fp_mb / mb:.2f}x")


if __name__ == "__main__":
    main()
