"""CPU deployment speed: our float32 and int8 inference vs ONNX Runtime and PyTorch, in one run.

The same classifier (the embedded MiniLM-L6-H384 unless ``--model_dir``), the same token ids
(half the rows padded to half length), on the same CPU, for each batch x sequence shape:

* ours float32 -- the NNX model under ``nnx.jit``;
* ours int8 (dynamic) -- `quant.to_integer_model` of a W8A8 model with per-token ranges;
* ours int8 (static) -- `quant.to_static_int8`: W8A8 with calibrated static activation scales,
  int8 weights and embedding codes, quantization fused into the producing op;
* ORT float32 -- onnxruntime on our ONNX export of the float model (`deploy.export_onnx`);
* ORT dynamic int8 -- ``onnxruntime.quantization.quantize_dynamic`` of that file (int8 weights,
  activations quantized per call): the usual CPU deployment;
* ORT ours int8 -- onnxruntime on our export of the static int8 model (our QAT / PTQ codes);
* PyTorch float32 and PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` of the
  Linear layers) on transformers' model of the same checkpoint.

Candidates alternate in blocks (`train.compare_latency` with a settling call per block, so the
OpenMP threads of one runtime do not slow the next); prints median ms per batch, the speed-up
over our float32 model, each int8 path's argmax agreement with its float model, and the ratio
ORT dynamic int8 / ours int8 (static) -- the goal is >= 1.2.

    python benchmarks/cpu_deployment.py [--shapes 8x128,1x128] [--repeats 5] [--rounds 3]
                                        [--threads N] [--skip torch,ort]
"""
import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from efficient_nlp import quant, train  # noqa: E402

from _common import minilm, random_batch  # noqa: E402

KEYS = ("input_ids", "attention_mask", "token_type_ids")


def ours(model, calib):
    """``{name: (forward(batch) -> logits, float reference name)}`` for our three models."""

    @nnx.jit
    def fwd(m, ids, mask, types):
        return m(ids, mask, types).logits

    qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))
    dyn, _ = quant.to_integer_model(qmodel)
    static = quant.to_static_int8(model, calib)
    out = {}
    for name, m in (("ours float32", model), ("ours int8 (dynamic)", dyn)):
        out[name] = (lambda b, m=m: fwd(m, *(b[k] for k in KEYS)), "ours float32")
    out["ours int8 (static)"] = (lambda b: static.forward(*(b[k] for k in KEYS)), "ours float32")
    return out, static


def ort(model, static, tmp, threads):
    from efficient_nlp import deploy

    fp = deploy.export_onnx(model, os.path.join(tmp, "float.onnx"))
    dyn = deploy.quantize_dynamic_onnx(fp, os.path.join(tmp, "dynamic_int8.onnx"))
    mine = deploy.export_onnx(static, os.path.join(tmp, "ours_int8.onnx"))
    out = {}
    for name, path, ref in (("ORT float32", fp, "ORT float32"), ("ORT dynamic int8", dyn, "ORT float32"),
                            ("ORT ours int8", mine, "ORT float32")):
        sess = deploy.ort_session(path, threads=threads)
        out[name] = (lambda b, s=sess: s.run(["logits"], {k: np.asarray(b[k], np.int64) for k in KEYS})[0], ref)
    sizes = {n: os.path.getsize(p) / 2**20 for n, p in (("float", fp), ("dynamic int8", dyn), ("ours int8", mine))}
    return out, sizes


def pytorch(model_dir, threads):
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    fp = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    dyn = torch.ao.quantization.quantize_dynamic(fp, {torch.nn.Linear}, dtype=torch.qint8)

    def call(m, b):
        with torch.inference_mode():
            return m(**{k: torch.as_tensor(np.asarray(b[k])).long() for k in KEYS}).logits.numpy()

    return {"PyTorch float32": (lambda b: call(fp, b), "PyTorch float32"),
            "PyTorch dynamic int8": (lambda b: call(dyn, b), "PyTorch float32")}, torch.get_num_threads()


def run_shape(cands, batch, args):
    names = list(cands)
    logits = {n: np.asarray(cands[n][0](batch)) for n in names}
    secs = train.compare_latency([lambda f=cands[n][0]: np.asarray(f(batch)) for n in names],
                                 repeats=args.repeats, warmup=2, rounds=args.rounds, settle=True)
    ms = dict(zip(names, (1e3 * s for s in secs)))
    base = ms["ours float32"]
    print(f"{'':<22}{'ms':>9}{'vs ours fp32':>14}{'argmax = float':>16}")
    for n in names:
        ref = cands[n][1]
        agree = "" if ref == n else f"{np.mean(logits[n].argmax(-1) == logits[ref].argmax(-1)):.3f}"
        print(f"{n:<22}{ms[n]:>9.1f}{base / ms[n]:>13.2f}x{agree:>16}")
    if "ORT dynamic int8" in ms:
        print(f"ORT dynamic int8 / ours int8 (static): {ms['ORT dynamic int8'] / ms['ours int8 (static)']:.2f}x "
              f"(goal >= 1.2)")
    return ms


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", default="")
    p.add_argument("--shapes", default="8x128,1x128", help="comma-separated BATCHxSEQ")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calib_batch", type=int, default=16, help="rows of the calibration batch (static scales)")
    p.add_argument("--threads", type=int, default=0, help="threads of ORT and PyTorch (0: their default)")
    p.add_argument("--skip", default="", help="comma-separated: torch, ort")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model, source = minilm(args.model_dir)
    vocab = model.config.vocab_size
    calib = random_batch(vocab, args.calib_batch, 128, seed=1)
    cands, static = ours(model, {k: calib[k] for k in KEYS})
    with tempfile.TemporaryDirectory() as tmp:
        if "ort" not in skip:
            more, sizes = ort(model, static, tmp, args.threads or None)
            cands.update(more)
            print("ONNX files (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
        if "torch" not in skip:
            from efficient_nlp import models

            more, threads = pytorch(args.model_dir or models.default_model_dir(), args.threads)
            cands.update(more)
            print(f"torch threads {threads}")
        print(f"{source}, jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}")
        for shape in args.shapes.split(","):
            b, s = (int(v) for v in shape.lower().split("x"))
            batch = random_batch(vocab, b, s, seed=0)
            print(f"\nbatch {b} x seq {s}")
            run_shape(cands, batch, args)


if __name__ == "__main__":
    main()
