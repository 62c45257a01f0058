"""Quantization (docs/quantization.md): quantizers, W-E-A specs by rules, the fake-quant model
transform, packed integer export, integer inference, cost accounting.

    from efficient_nlp import quant
    spec = quant.make_spec(2, 2, 8)                      # TWN weights / embeddings, 8-bit activations
    qmodel, report = quant.quantize_model(model, spec)   # a fake-quantized copy (simulation)
    print(report); print(quant.cost_report(model, spec, batch))
    quant.save_packed(quant.export_packed(qmodel), out_dir)   # real bit-packed integer artefact
    imodel, _ = quant.to_integer_model(qmodel)           # int8 dot_general inference
    static = quant.to_static_int8(model, batch)          # static-scale int8 for CPU: static.forward(ids, mask, types)
    binary, _ = quant.split_model(qmodel)                # TWN -> two BWN halves, same function (BinaryBERT)

One-shot per-layer methods (docs/oneshot.md): `rtn`, `gptq`, `awq_scales`, `awq_clip`, `smoothquant_scales` on a kernel and its input statistics (`init_stats`,
`hessian_update`); the model-level pass is `efficient_nlp.oneshot`.  Group-wise scales:
``make_spec(..., weight_group_size=128)``.  The compressed-tensors format:
`save_compressed_tensors`, `load_compressed_tensors`.

Post-training quantization by reconstruction (docs/quantization.md): `ptq` (calibration_set,
partition, rem, layer_errors), `mrem` (mrem_s) and `mrem_parallel` (mrem_p), all three returning
a `ptq.Reconstruction` ``(model, report, info)``; see those modules.  Every transform reads the
model's layout from its family (`efficient_nlp.models.family`).
"""
from efficient_nlp.quant.cost import CostReport, cost_report, cost_table
from efficient_nlp.quant.export import (
    PackedArtifactError,
    artifact_nbytes,
    dequantize_weight,
    export_packed,
    load_packed,
    packed_size_mb,
    quantized_weights,
    restore,
    save_packed,
    unpacked_weights,
    weight_codes,
)
from efficient_nlp.quant.integer import (
    DequantLinear,
    IntegerReport,
    IntEmbed,
    IntAttention,
    IntLinear,
    IntSplitEmbed,
    IntSplitLinear,
    activation_codes,
    int8_matmul,
    to_integer_model,
)
from efficient_nlp.quant.static_int8 import StaticInt8, to_static_int8
from efficient_nlp.quant.modules import AttentionQuant, QuantEmbed, QuantizerModule, QuantLinear
from efficient_nlp.quant.packing import pack, packed_nbytes, unpack
from efficient_nlp.quant.quantizers import (
    binary_codes,
    bwn,
    clip_quant,
    dequantize,
    lsq,
    lsq_init,
    lsq_plus,
    quantize_codes,
    qrange,
    ternary_codes,
    twn,
    uniform,
    uniform_params,
)
from efficient_nlp.quant.spec import QUANTIZERS, Quantizer, QuantSpec, make_spec, register_quantizer, spec_from_config
from efficient_nlp.quant import adaptive, sharpness  # noqa: E402  (submodules: adaptive splitting, sharpness)
from efficient_nlp.quant.adaptive import choose_split, group_sites, knapsack, sensitivity, split_costs
from efficient_nlp.quant.sharpness import part_sharpness, plot_sharpness, top_eigenvalue
from efficient_nlp.quant.splitting import (
    SplitEmbed,
    SplitLinear,
    SplitReport,
    split_model,
    split_modules,
    splittable_sites,
    ternary_weight_split,
    tws_scalars,
)
from efficient_nlp.quant.transform import QuantReport, calibrate, find_sites, quantize_model, quantizer_modules
from efficient_nlp.quant import mrem, ptq  # noqa: E402  (submodules: PTQ by reconstruction)
from efficient_nlp.quant.mrem import mrem_s
from efficient_nlp.quant.mrem_parallel import mrem_p
from efficient_nlp.quant.ptq import calibration_set, layer_errors, partition, rem
from efficient_nlp.quant import rounding, smoothing  # noqa: E402  (one-shot per-layer methods)
from efficient_nlp.quant.rounding import InputStats, expand_scales, gptq, hessian_update, init_stats, layer_error, rtn
from efficient_nlp.quant.smoothing import awq_clip, awq_scales, scale_kernel, smoothquant_scales
from efficient_nlp.quant.quantizers import activation_axis, check_group_size, clip_bounds, group_view, positive_step, ungroup
from efficient_nlp.quant.integer import group_int8_matmul
from efficient_nlp.quant.compressed_tensors import (CompressedTensorsError, load_compressed_tensors,
                                                    save_compressed_tensors)

__all__ = [
    "uniform", "uniform_params", "quantize_codes", "dequantize", "qrange", "clip_quant", "lsq", "lsq_init",
    "lsq_plus", "twn", "bwn", "ternary_codes", "binary_codes", "pack", "unpack", "packed_nbytes",
    "QUANTIZERS", "register_quantizer", "Quantizer", "QuantSpec", "make_spec", "spec_from_config", "QuantReport", "quantize_model",
    "calibrate", "find_sites", "quantizer_modules", "QuantizerModule", "QuantLinear", "QuantEmbed",
    "AttentionQuant", "CostReport", "cost_report", "cost_table",
    "PackedArtifactError", "export_packed", "save_packed", "load_packed", "packed_size_mb", "restore",
    "weight_codes", "dequantize_weight", "unpacked_weights", "quantized_weights", "artifact_nbytes",
    "to_integer_model", "to_static_int8", "StaticInt8", "IntegerReport", "IntAttention", "IntLinear", "IntSplitLinear", "IntSplitEmbed", "DequantLinear", "IntEmbed", "activation_codes",
    "int8_matmul", "ptq", "mrem", "calibration_set", "partition", "rem", "mrem_s", "mrem_p", "layer_errors",
    "ternary_weight_split", "tws_scalars", "split_model", "splittable_sites", "split_modules", "SplitLinear",
    "SplitEmbed", "SplitReport", "adaptive", "sharpness", "group_sites", "sensitivity", "split_costs", "knapsack",
    "choose_split", "part_sharpness", "top_eigenvalue", "plot_sharpness",
    "rounding", "smoothing", "InputStats", "init_stats", "hessian_update", "layer_error", "rtn", "gptq",
    "expand_scales", "awq_scales", "awq_clip", "smoothquant_scales", "scale_kernel", "group_view", "ungroup", "check_group_size",
    "activation_axis", "positive_step", "clip_bounds", "group_int8_matmul", "save_compressed_tensors", "load_compressed_tensors", "CompressedTensorsError",
]
