"""A small ONNX graph builder over ``onnx.helper``: named nodes, initializers and constants.

Every emitter of `efficient_nlp.deploy.onnx_export` writes through one `Graph`:

    g = Graph()
    w = g.weight(kernel, "layer0.q.kernel")          # an initializer (numpy array)
    y = g.op("MatMul", [x, w], "layer0.q.matmul")     # a node; returns its output name
    s = g.const(0.125)                                # a float32 scalar constant (shared)

Names are made unique by a counter suffix, so emitters can pass readable hints without
coordinating.  Weights are de-duplicated by the identity of the array object they come from
(a layer shared by several positions is stored once).
"""
from __future__ import annotations

import numpy as np


def _onnx():
    try:
        import onnx
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("ONNX export needs the onnx package: pip install onnx onnxruntime") from e
    return onnx


class Graph:
    """Nodes and initializers of one ONNX graph under construction (see the module docstring)."""

    def __init__(self, opset: int = 17):
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._used: set[str] = set()
        self._consts: dict = {}
        self._weights: dict = {}

    def name(self, hint: str) -> str:
        """A fresh tensor / node name starting with ``hint``."""
        base = hint.replace("/", ".") or "t"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def weight(self, array, hint: str, *, key=None) -> str:
        """An initializer holding ``array`` (its dtype kept); ``key``: any hashable that identifies
        the source tensor, so the same tensor reached twice is stored once."""
        if key is not None and key in self._weights:
            return self._weights[key]
        numpy_helper = _onnx().numpy_helper
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(array)), name))
        if key is not None:
            self._weights[key] = name
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A constant initializer (scalars and small arrays are shared by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(arr, f"const.{arr.dtype.name}")
        return self._consts[key]

    def op(self, op_type: str, inputs, hint: str | None = None, *, outputs: int = 1, **attrs):
        """Append an ``op_type`` node reading ``inputs`` (names; ``""`` = an absent optional input);
        returns its output name, or a tuple of ``outputs`` names."""
        helper = _onnx().helper
        hint = hint or op_type
        outs = [self.name(hint if outputs == 1 else f"{hint}.{k}") for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(f"node.{hint}"), **attrs))
        return outs[0] if outputs == 1 else tuple(outs)

    def reduce(self, op_type: str, x: str, axes, hint: str | None = None, *, keepdims: bool = True) -> str:
        """``op_type`` (ReduceMax, ReduceMin, ReduceSum, ...) over ``axes``: an attribute before
        opset 18 (13 for ReduceSum), an input from then on."""
        axes = [int(a) for a in axes]
        new_style = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if new_style:
            return self.op(op_type, [x, self.const(axes, np.int64)], hint, keepdims=int(keepdims))
        return self.op(op_type, [x], hint, axes=axes, keepdims=int(keepdims))

    def model(self, inputs, outputs, *, opset: int, name: str, doc: str = "", metadata: dict | None = None):
        """The ``onnx.ModelProto``; ``inputs`` / ``outputs``: ``onnx.ValueInfoProto`` lists."""
        onnx = _onnx()
        graph = onnx.helper.make_graph(self.nodes, name, inputs, outputs, self.initializers, doc_string=doc)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                       producer_name="efficient_nlp")
        # An IR version every onnxruntime of the opset reads (make_model picks the newest).
        model.ir_version = min(model.ir_version, 8 if opset <= 18 else 9)
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        return model
