"""ONNX Runtime helpers: a CPU session and ORT's own dynamic int8 quantization (a baseline).

    sess = ort_session("model.onnx", threads=2)
    quantize_dynamic_onnx("model.onnx", "model.int8.onnx")   # onnxruntime.quantization, QInt8 weights
    optimized_model("model.onnx", "model.opt.onnx")          # the graph ONNX Runtime runs after its fusions

`quantize_dynamic_onnx` is ONNX Runtime's recipe, not ours: per-tensor uint8 activations with
ranges computed per call over the whole tensor (``DynamicQuantizeLinear``) and int8 weights,
applied to the MatMul nodes of an exported float model.
"""
from __future__ import annotations

import os


def _ort():
    try:
        import onnxruntime
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("running ONNX models needs onnxruntime: pip install onnxruntime") from e
    return onnxruntime


def ort_session(path, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU for ``path``; ``threads``: intra-op threads
    (None: ONNX Runtime's default, one per core), inter-op runs sequentially."""
    ort = _ort()
    options = ort.SessionOptions()
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])


#: `optimized_model` levels -> ``onnxruntime.GraphOptimizationLevel`` names.
OPTIMIZATION_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def optimized_model(src, dst, level: str = "extended") -> str:
    """Write the graph ONNX Runtime runs for ``src`` after its graph optimizations at ``level``
    (``"basic"``, ``"extended"``: the fusions, e.g. QDQ -> ``MatMulIntegerToFloat``, Gelu;
    ``"all"`` adds layout changes specific to this machine) to ``dst``; returns ``dst``."""
    ort = _ort()
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"level must be one of {sorted(OPTIMIZATION_LEVELS)}, got {level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[level])
    options.optimized_model_filepath = os.fspath(dst)
    ort.InferenceSession(os.fspath(src), sess_options=options, providers=["CPUExecutionProvider"])
    return os.fspath(dst)


def quantize_dynamic_onnx(src, dst) -> str:
    """ONNX Runtime's dynamic int8 quantization (``onnxruntime.quantization.quantize_dynamic``,
    ``weight_type=QInt8``) of the float model ``src``, written to ``dst``; returns ``dst``."""
    _ort()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(os.fspath(src), os.fspath(dst), weight_type=QuantType.QInt8)
    return os.fspath(dst)


__all__ = ["OPTIMIZATION_LEVELS", "optimized_model", "ort_session", "quantize_dynamic_onnx"]
