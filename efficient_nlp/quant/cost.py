"""Cost accounting for a model under a `QuantSpec`: parameters, stored size, FLOPs and BOPs.

* Stored size: every quantized weight at its bit width plus one float32 scale per scale group
  (per tensor, per channel, or per group of ``g`` input rows and output column: ``d_in / g * d_out``
  scales for a group-wise kernel); everything else (LayerNorm, biases, position / token-type
  embeddings, classifier, learned quantizer state) at 32 bits.
* FLOPs per example: ``2 x MACs`` of every matmul (Linear layers and the two attention
  matmuls of each layer), found by tracing one forward pass abstractly (``jax.eval_shape``, nothing runs).
* BOPs (docs/quantization.md): a matmul whose two operands are both quantized to m and n <= 8 bits
  counts ``FLOPs * m * n / 64``; a matmul with a float operand counts its full FLOPs.  This is
  the convention of the BinaryBERT / TernaryBERT tables (full-precision BERT-base: 22.5 G).
* Ternary weight splitting (``split=``, docs/binarybert.md): a split matrix is two binary matrices:
  2 x 1 bit per weight plus two sets of scales, and the BOPs of both binary matmuls.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp.models import family as F
from efficient_nlp.quant import modules as M
from efficient_nlp.quant.spec import QuantSpec, make_spec
from efficient_nlp.quant.splitting import SPLIT_MODULES, split_model
from efficient_nlp.quant.transform import quantize_model, quantizer_modules


@dataclasses.dataclass
class CostReport:
    """Totals (``params``, ``size_mb``, ``fp32_size_mb``, ``flops``, ``bops`` per example) and
    per-matmul ``rows`` (site, kind, w_bits, a_bits, flops, bops)."""

    spec_bits: str
    params: int
    size_mb: float
    fp32_size_mb: float
    flops: float
    bops: float
    rows: list

    def summary(self) -> dict[str, float]:
        return {"params": self.params, "size_mb": self.size_mb, "flops": self.flops, "bops": self.bops}

    def __str__(self):
        return (f"{self.spec_bits:>8}: params {self.params:,}  size {self.size_mb:.2f} MB "
                f"({self.fp32_size_mb / self.size_mb:.1f}x smaller than fp32)  "
                f"FLOPs {self.flops / 1e9:.3f} G  BOPs {self.bops / 1e9:.3f} G per example")


def _bops(flops, w_bits, a_bits):
    if w_bits <= 8 and a_bits <= 8:
        return flops * w_bits * a_bits / 64
    return flops


def _default_forward(inputs):
    def run(model):
        return F.forward(model, inputs)
    return run


def _scale_groups(shape, axis, group_size: int = 0) -> int:
    """Scales of a weight of ``shape`` whose quantizer reduces ``axis`` (None: one), or reduces
    axis 0 in blocks of ``group_size`` (``shape[0] / group_size`` per remaining index)."""
    if group_size:
        return math.prod(shape) // group_size
    return 1 if axis is None else math.prod(s for i, s in enumerate(shape) if i != axis)


def cost_report(model, spec: QuantSpec | None, inputs: dict[str, Any] | Callable, *,
                split: bool | Sequence[str] = False) -> CostReport:
    """Cost of ``model`` (a float model) quantized by ``spec`` (None = full precision).

    ``inputs``: one example batch for the models of `efficient_nlp.models` (``input_ids``
    [B,T] ...; costs are divided by B), or a callable ``fn(model) -> output`` (then B = 1).  ``split`` (ternary weight splitting,
    docs/binarybert.md; needs TWN weights in ``spec``): True splits every TWN matrix, a list of sites
    only those (`efficient_nlp.quant.split_model`): a split matrix stores two 1-bit weights and
    two sets of scales and its matmul counts the BOPs of both binary halves; TWN matrices not
    split count as BWN (1 bit).  ``params`` then counts both halves.
    """
    spec = spec or make_spec(32, 32, 32)
    wrapped, _ = quantize_model(model, spec, keep_float_sites=True)
    if split is not False:
        wrapped, _ = split_model(wrapped, None if split is True else split)
    for _, q in quantizer_modules(wrapped):
        q.calibrated = True  # abstract trace only: values do not matter
    run = inputs if callable(inputs) else _default_forward(inputs)
    batch = 1 if callable(inputs) else int(jnp.asarray(inputs["input_ids"]).shape[0])
    with M.recording() as records:
        jax.eval_shape(lambda: run(wrapped))
    rows, flops, bops = [], 0.0, 0.0
    for r in records:
        f = 2.0 * r["macs"] / batch
        b = _bops(f, r["w_bits"], r["a_bits"])
        rows.append(dict(site=r["site"], kind=r["kind"], w_bits=r["w_bits"], a_bits=r["a_bits"], flops=f, bops=b))
        flops, bops = flops + f, bops + b

    # Parameters of the model itself; learned quantizer state (steps, clips) only adds size.
    params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bits = 32.0 * sum(int(x.size) for x in jax.tree.leaves(nnx.state(wrapped, nnx.Param)))
    for _, mod in nnx.iter_modules(wrapped):
        wq = getattr(mod, "weight_quant", None)
        if isinstance(mod, (M.QuantLinear, M.QuantEmbed)) and wq is not None:
            shape = (mod.kernel if isinstance(mod, M.QuantLinear) else mod.embedding)[...].shape
            bits += math.prod(shape) * (wq.quantizer.bits - 32) + 32 * _scale_groups(shape, wq.axis,
                                                                                      wq.quantizer.group_size)
        elif isinstance(mod, SPLIT_MODULES):
            for i, (attr, half_q, _) in enumerate(mod.halves()):
                shape = getattr(mod, attr)[...].shape
                params += i * math.prod(shape)  # the second half is extra
                bits += math.prod(shape) * (half_q.quantizer.bits - 32) + 32 * _scale_groups(shape, half_q.axis)
    return CostReport(_wea(spec, split is not False), params, bits / 8 / 2**20, 32 * params / 8 / 2**20, flops,
                      bops, rows)


def _wea(spec: QuantSpec, split: bool) -> str:
    """The W-E-A name; split TWN roles count as 1 bit (two binary halves)."""
    def b(q):
        return "32" if q is None else "1" if split and q.method == "twn" else str(q.bits)
    return f"{b(spec.weight)}-{b(spec.embedding)}-{b(spec.activation)}"


def cost_table(model, specs: dict[str, QuantSpec | None], inputs) -> str:
    """A Markdown table of `cost_report` for several specs (e.g. full precision and 2-2-8)."""
    lines = ["| setting | W-E-A | params | size (MB) | FLOPs (G) | BOPs (G) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, spec in specs.items():
        r = cost_report(model, spec, inputs)
        lines.append(f"| {name} | {r.spec_bits} | {r.params:,} | {r.size_mb:.2f} | {r.flops / 1e9:.3f} | "
                     f"{r.bops / 1e9:.3f} |")
    return "\n".join(lines)
