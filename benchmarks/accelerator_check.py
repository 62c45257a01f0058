"""One check for a GPU / TPU: bf16 training speed and MFU, the int8 GEMM, sharded training and exactness.

Run it on an accelerator machine (it also runs on a CPU, where the numbers only show that it works):

    python benchmarks/accelerator_check.py --out docs/accelerator_check.md

Sections (each prints a markdown table; ``--out`` also writes them to a file):

1. **Training step**: our MiniLM fine-tuning step and the pre-trained decoder's causal-LM step in
   float32 and with ``train.compute_dtype="bfloat16"`` (float32 master weights and optimizer
   state): median ms per step, tokens/s, model FLOPs utilisation (MFU = the step's model FLOPs /
   step time / the device's peak bf16 FLOP/s from `efficient_nlp.train.compute.DEVICE_SPECS`).
2. **int8 GEMM**: ``int8_matmul`` (int8 x int8 -> int32, the integer model's kernel) for several
   shapes: whether the compiled program really multiplies s8 operands into s32 (read from the
   optimized HLO: an ``s8`` x ``s8`` dot / GEMM call with an ``s32`` result, not an upcast to
   float) and its time against a bf16 matmul of the same shape.
3. **Sharded training**: a model whose parameters are split over all devices (``fsdp`` and
   ``tensor`` sharding on the 2-D ``(data, model)`` mesh): the loss of a few steps against the
   replicated run, and the per-device shard shape of one kernel.
4. **Exactness at the default matmul precision**: the integer model against the fake-quant model
   and a float32 matmul against a float64 reference, at the backend's default precision and at
   ``"highest"`` (GPUs use TF32 and TPUs bf16 passes by default; CPUs compute float32 either way).

``--tiny`` uses tiny random models (seconds, for a smoke run on a CPU).
"""
import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from _common import minilm, random_batch
from efficient_nlp import models, quant, train
from efficient_nlp.models import flops as model_flops
from efficient_nlp.train import compute


def _median_ms(fn, steps, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _table(title, header, rows):
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _peak():
    spec = compute.device_spec(jax.devices()[0].device_kind)
    return None if spec is None else spec.peak_flops_per_second


def _train_config(**train_keys):
    cfg = train.default_train_config()
    cfg.update(train_keys)
    return ml_collections.ConfigDict({"train": cfg})


# ----------------------------------------------------------------------------- models
def _encoder(tiny):
    if tiny:
        cfg = models.BertConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, num_labels=2)
        return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), "tiny random BERT"
    return minilm()


def _decoder(tiny):
    if tiny:
        cfg = models.DecoderConfig(model_type="llama", vocab_size=2048, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   max_position_embeddings=256)
        return models.DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)), "tiny random Llama"
    return models.from_pretrained(models.default_decoder_dir()), "pre-trained decoder"


def _losses():
    from efficient_nlp.recipes.finetune import task_loss
    return task_loss


# ----------------------------------------------------------------------------- 1. training step
def train_step_section(args):
    loss_fn = _losses()
    peak = _peak()
    rows = []
    for kind in ("encoder", "decoder"):
        for dtype in ("float32", "bfloat16"):
            model, name = _encoder(args.tiny) if kind == "encoder" else _decoder(args.tiny)
            batch = random_batch(model.config.vocab_size, args.batch, args.seq)
            if kind == "decoder":
                batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
            runner = train.make_step_runner(model, loss_fn, config=_train_config(compute_dtype=dtype,
                                                                                  batch_size=args.batch))
            ms = _median_ms(lambda: runner(batch), args.steps)
            step_flops = model_flops.train_flops(model, args.seq, args.batch)
            achieved = step_flops / (ms / 1e3)
            mfu = f"{100 * achieved / (peak * jax.device_count()):.1f}%" if peak else "n/a (peak unknown)"
            rows.append((name, dtype, f"{ms:.1f}", f"{args.batch * args.seq / (ms / 1e3):,.0f}",
                         f"{achieved / 1e12:.2f}", mfu))
    return _table(f"Training step (batch {args.batch} x {args.seq})",
                  ("model", "compute", "ms / step", "tokens / s", "model TFLOP/s", "MFU"), rows)


# ----------------------------------------------------------------------------- 2. int8 GEMM
_DEF = re.compile(r"%([\w.\-]+) = \(?(\w+)\[")
_OP = re.compile(r"= \(?s32\[[^=]*?\b(dot|convolution|custom-call)\(([^)]*)\)")


def _is_int8_gemm(hlo: str) -> bool:
    """True if the optimized HLO has a dot / convolution / GEMM library call with an s32 result
    whose operands are s8 (not converted to a wider type first).  Operand types are looked up
    from their definitions (newer HLO text does not repeat them at the use)."""
    types = dict(_DEF.findall(hlo))
    for line in hlo.splitlines():
        match = _OP.search(line)
        if match:
            operands = re.findall(r"%([\w.\-]+)", match.group(2))
            if operands and all(types.get(o) == "s8" for o in operands[:2]):
                return True
    return False


def int8_section(args):
    shapes = [(64, 256, 256), (512, 1024, 1024), (2048, 4096, 4096)] if not args.tiny else [(8, 32, 32), (64, 128, 128)]
    rows = []
    rng = np.random.default_rng(0)
    f_int = jax.jit(quant.int8_matmul)
    f_bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    for m, k, n in shapes:
        a8 = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
        b8 = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
        a16, b16 = a8.astype(jnp.bfloat16), b8.astype(jnp.bfloat16)
        hlo = f_int.lower(a8, b8).compile().as_text()
        exact = bool(jnp.array_equal(f_int(a8, b8), np.asarray(a8, np.int64) @ np.asarray(b8, np.int64)))
        t_int = _median_ms(lambda: f_int(a8, b8), args.steps)
        t_bf = _median_ms(lambda: f_bf16(a16, b16), args.steps)
        rows.append((f"{m}x{k}x{n}", "yes" if _is_int8_gemm(hlo) else "no (upcast)", "yes" if exact else "NO",
                     f"{t_int:.3f}", f"{t_bf:.3f}", f"{t_bf / t_int:.2f}x"))
    return _table("int8 GEMM (int8 x int8 -> int32) vs bf16",
                  ("M x K x N", "s8 x s8 -> s32 in HLO", "exact", "int8 ms", "bf16 ms", "speed-up"), rows)


# ----------------------------------------------------------------------------- 3. sharded training
def _first_kernel(params, site):
    """The first kernel leaf whose path names ``site``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if site in names and "kernel" in names:
            return getattr(leaf, "value", leaf)
    raise KeyError(f"no {site} kernel in the parameters")


def sharding_section(args):
    loss_fn = _losses()
    n = jax.device_count()
    model_axis = 2 if n % 2 == 0 and n > 1 else 1
    runs = [("replicated", {"data": -1, "model": 1}), ("fsdp", {"data": -1, "model": 1}),
            ("tensor", {"data": -1, "model": model_axis}), ("fsdp+tensor", {"data": -1, "model": model_axis})]
    rows, reference = [], None
    for rule, mesh in runs:
        model, name = _encoder(True)
        batch = random_batch(model.config.vocab_size, max(args.batch, n), 32)
        runner = train.make_step_runner(model, loss_fn, config=_train_config(sharding=rule, mesh=mesh,
                                                                              learning_rate=1e-3, batch_size=len(batch["labels"])))
        losses = [float(runner(batch)) for _ in range(3)]
        reference = reference or losses
        kernel = _first_kernel(runner.state.params, "query")
        shard = kernel.addressable_shards[0].data.shape
        rows.append((rule, f"{mesh['data'] if mesh['data'] > 0 else n // mesh['model']} x {mesh['model']}",
                     f"{losses[-1]:.6f}", f"{abs(losses[-1] - reference[-1]):.1e}", f"{tuple(kernel.shape)} -> {shard}"))
    return _table(f"Sharded training ({n} devices, tiny BERT, 3 steps)",
                  ("sharding", "mesh data x model", "loss", "abs diff vs replicated", "query kernel -> shard"), rows)


# ----------------------------------------------------------------------------- 4. exactness
def exactness_section(args):
    model, _ = _encoder(True)
    batch = random_batch(model.config.vocab_size, 4, 32)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))
    imodel, _ = quant.to_integer_model(qmodel)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 512)), rng.standard_normal((512, 256))
    ref = a @ b
    rows = []
    for precision in ("default", "highest"):
        with jax.default_matmul_precision(None if precision == "default" else "highest"):
            fq = np.asarray(jax.jit(lambda m, x: m(**x).logits)(qmodel, inputs))
            iq = np.asarray(jax.jit(lambda m, x: m(**x).logits)(imodel, inputs))
            mm = np.asarray(jax.jit(jnp.dot)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        rows.append((precision, f"{np.max(np.abs(fq - iq)):.2e}",
                     "yes" if (fq.argmax(-1) == iq.argmax(-1)).all() else "no",
                     f"{np.max(np.abs(mm - ref)) / np.max(np.abs(ref)):.2e}"))
    return _table("Exactness (W8A8 tiny BERT; 256x512x256 float32 matmul)",
                  ("matmul precision", "max abs diff int8 vs fake quant (logits)", "argmax equal", "float32 matmul rel. error vs float64"),
                  rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--tiny", action="store_true", help="tiny random models (smoke run)")
    p.add_argument("--out", default="", help="also write the tables to this markdown file")
    args = p.parse_args()
    dev = jax.devices()[0]
    head = (f"## Accelerator check\n\n{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"
            f"{', tiny models' if args.tiny else ''}\n"
            + ("\nA CPU run: it shows that the checks work, not accelerator numbers.\n" if dev.platform == "cpu" else ""))
    print(head, flush=True)
    parts = [head]
    for section in (train_step_section, int8_section, sharding_section, exactness_section):
        text = section(args)
        print(text, flush=True)
        parts.append(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(parts))


if __name__ == "__main__":
    main()
