"""Batch independence of quantized models, and the all-reduces of a data-parallel QAT step.

    python benchmarks/quant_invariance.py [--devices 4] [--bits 8]

Prints two things for a tiny random BERT classifier (hidden 32, 2 layers, 4 heads):

* invariance: the largest ``|logit difference|`` between a row run alone (length 12, no padding)
  and the same row inside a batch of 4 padded to length 20 (the other rows random), for the
  float model, fake quantization with ``uniform`` (dynamic) and ``lsq`` (learned) activations,
  and the integer models of both.  0 means the row's prediction never depends on its batch;
  float rounding of differently shaped matmuls may leave ~1e-7.
* all-reduces: the number of ``all-reduce`` instructions in the compiled HLO of one jitted
  data-parallel QAT train step (W-E-A ``bits``-``bits``-``bits``, ``uniform`` activations, SGD)
  on a 1-D mesh ``data`` of ``--devices`` simulated CPU devices, the batch sharded over it and
  the parameters replicated.  The gradient all-reduce is unavoidable (XLA may fuse it into one
  tuple all-reduce); every other one is a quantizer range reduced across the batch.
"""
import argparse
import os
import sys


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices for the train step")
    p.add_argument("--bits", type=int, default=8, help="W-E-A bits of the quantized models")
    return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:  # must precede the first jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={ARGS.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from efficient_nlp import models, quant  # noqa: E402
from efficient_nlp.models import family as F  # noqa: E402

VOCAB = 64


def tiny_bert(seed=0):
    cfg = models.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, num_labels=3, max_position_embeddings=32,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params))
    return model


def batch(rows, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def alone_and_padded(length=12, padded=20, rows=4, at=1):
    """``(alone, padded)``: one row of ``length`` tokens, and a batch of ``rows`` rows of
    ``padded`` tokens holding that row (masked after ``length``) at index ``at``."""
    one = batch(1, length, seed=1)
    big = batch(rows, padded, seed=2)
    big["input_ids"][at, :length] = one["input_ids"][0]
    big["attention_mask"][at, length:] = 0
    big["input_ids"][at, length:] = 0
    return one, big


@nnx.jit
def logits(model, b):
    return F.forward(model, b).logits


def invariance(model, at=1):
    one, big = alone_and_padded(at=at)
    return float(jnp.max(jnp.abs(logits(model, one)[0] - logits(model, big)[at])))


def quantized_models(bits):
    float_model = tiny_bert()
    out = {"float": float_model}
    for method in ("uniform", "lsq"):
        qm, _ = quant.quantize_model(float_model, quant.make_spec(bits, bits, bits, activation_method=method))
        if method == "lsq":
            quant.calibrate(qm, batch(8, 20, seed=3))
        out[method] = qm
        out[f"{method} integer"] = quant.to_integer_model(qm)[0]
    return out


def count_all_reduces(bits, devices):
    """All-reduce instructions in the compiled HLO of one data-parallel QAT SGD step."""
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))  # Auto axes: XLA inserts collectives
    qm, _ = quant.quantize_model(tiny_bert(), quant.make_spec(bits, bits, bits))
    graphdef, params, rest = nnx.split(qm, nnx.Param, ...)
    tx = optax.sgd(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, b):
        model = nnx.merge(graphdef, p, rest)
        out = F.forward(model, b).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, b["labels"]).mean()

    def step(p, o, b):
        grads = jax.grad(loss_fn)(p, b)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o

    b = batch(4 * devices, 16, seed=4)
    b["labels"] = np.zeros(4 * devices, np.int32)
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    b = jax.device_put(b, data)
    params, opt_state = jax.device_put((params, opt_state), repl)
    hlo = jax.jit(step, in_shardings=(repl, repl, data), out_shardings=(repl, repl)).lower(
        params, opt_state, b).compile().as_text()
    return sum(1 for line in hlo.splitlines() if "all-reduce(" in line or "all-reduce-start(" in line)


def main():
    print(f"max |logit(row alone) - logit(row in a padded batch)|, W{ARGS.bits}A{ARGS.bits}:")
    for name, model in quantized_models(ARGS.bits).items():
        print(f"  {name:<16} {invariance(model):.3e}")
    print(f"all-reduce instructions in one data-parallel QAT step on {ARGS.devices} devices: "
          f"{count_all_reduces(ARGS.bits, ARGS.devices)}")


if __name__ == "__main__":
    sys.exit(main())
