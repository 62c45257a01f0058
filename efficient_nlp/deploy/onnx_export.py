"""ONNX export of the encoder sequence classifiers, float and integer, with our own emitter.

    path = deploy.export_onnx(model, "model.onnx")   # float, to_integer_model or to_static_int8 output
    sess = deploy.ort_session(path)
    logits, = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})

The graph is written op by op from the model's layout (`efficient_nlp.models.family`), with the
forward math of `efficient_nlp.models.bert`; inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` (int64 ``[batch, seq]``, both axes dynamic unless ``batch`` / ``seq`` pin
them), output ``logits`` (float32 ``[batch, num_labels]``):

* embeddings: ``Gather`` of the word, position (``Range`` over the sequence; RoBERTa's
  ``CumSum(ids != pad) * (ids != pad) + pad``) and token-type tables (absent for DistilBERT,
  whose ``token_type_ids`` input is then unused), summed, ``LayerNormalization`` (the config's
  epsilon), ELECTRA's projection;
* attention: q / k / v Linears, ``Reshape`` to ``[B,T,N,D]`` and ``Transpose`` to head-major,
  ``MatMul`` ``q @ k^T`` times ``1/sqrt(D)``, plus the additive mask bias
  (``where(mask > 0, 0, MASK_VALUE)`` with ``MASK_VALUE`` = half of float32's minimum, as
  `bert.attention_bias`), ``Softmax`` on the last axis, ``MatMul`` with v, back to ``[B,T,N*D]``,
  output Linear, residual, ``LayerNormalization``;
* feed-forward: Linear, activation (exact GELU ``0.5 x (1 + erf(x / sqrt 2))``, the pattern
  ONNX Runtime fuses into one ``BiasGelu`` kernel, tanh GELU
  ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, ReLU, SiLU), Linear, residual,
  ``LayerNormalization``;
* head: BERT's pooler ``tanh(dense(h[:, 0]))`` then ``classifier``; the other families'
  ``pre_classifier`` + ``classifier_act`` on the first token, then ``classifier``.  Dropout is
  the identity at inference and is not emitted.

Integer models (`efficient_nlp.quant.to_integer_model`): `IntLinear` sites become activation
quantization ops + ``MatMulInteger`` on int8 weight initializers (`onnx_quant`), `IntAttention`
the same for ``q.k^T`` and ``probs.v``, `IntEmbed` an int8 table gathered and rescaled per row.
Static int8 models (`efficient_nlp.quant.to_static_int8`, static PACT / LSQ activation scales):
`StaticLinear` sites (q / k / v fused in one product, then ``Split``) become the QDQ form ONNX
Runtime fuses into ``MatMulIntegerToFloat`` (`onnx_qdq`); attention's products stay as the
static model computes them.

Sites without an integer mapping (group-wise scales, ternary splits, sites the integer
conversion kept fake-quantized, weight-only `DequantLinear`) are exported with their dequantized
float weight and their activation fake-quantized in float -- the same function, float matmuls --
and listed in the report (`ExportReport`, stored in the file's metadata and returned by
`export_report`).  A fake-quantized model (`quant.quantize_model`) is refused: convert it with
``quant.to_integer_model`` (or ``quant.to_static_int8``) first, so the file holds int8 weights
and int8 matmuls.

All parameters are exported in float32 whatever the model's dtypes.
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from flax import nnx

from efficient_nlp.deploy import onnx_qdq as QDQ
from efficient_nlp.deploy import onnx_quant as OQ
from efficient_nlp.deploy.onnx_graph import Graph, _onnx
from efficient_nlp.models import bert as B
from efficient_nlp.models import family as F
from efficient_nlp.quant import integer as I
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import static_int8 as S
from efficient_nlp.quant.export import dequantize_weight

REPORT_KEY = "efficient_nlp.export_report"
#: The report's name of the QDQ form of a static int8 Linear site (`onnx_qdq`).
QDQ_FORM = "int8 QDQ MatMul"
INT64 = 7


@dataclasses.dataclass
class ExportReport:
    """``rows`` of ``(site, emitted as, note)`` for every quantized site of an integer model."""

    rows: list

    @property
    def float_fallbacks(self) -> list[str]:
        return [site for site, kind, _ in self.rows if kind.startswith("float")]

    def __str__(self):
        if not self.rows:
            return "ONNX export: float model (no quantized sites)"
        width = max(len(r[0]) for r in self.rows)
        head = (f"ONNX export: {len(self.rows) - len(self.float_fallbacks)} of {len(self.rows)} quantized sites "
                f"run int8 ops")
        return "\n".join([head] + [f"{s:<{width}}  {k:<24}  {n}" for s, k, n in self.rows])


# ----------------------------------------------------------------------------- validation
_INTEGER_TYPES = (I.IntLinear, I.IntEmbed, I.DequantLinear, I.IntAttention, I.IntSplitLinear, I.IntSplitEmbed,
                  S.StaticLinear, S.StaticAttention)
_FAKE_TYPES = (M.QuantLinear, M.QuantEmbed, M.AttentionQuant)


def check_exportable(model) -> None:
    """Raise ValueError unless ``model`` is an encoder sequence classifier this exporter covers."""
    if not isinstance(model, B.BertForSequenceClassification):
        raise ValueError(f"export_onnx supports the encoder sequence classifiers (BertForSequenceClassification of "
                         f"the bert, roberta, distilbert, electra and data2vec_text families), got "
                         f"{type(model).__name__}; decoders and masked-LM heads are not exported")
    F.family_of(model)  # a FamilyError names an unknown family
    types = {type(m) for _, m in nnx.iter_modules(model)}
    types |= {type(getattr(m, "matmul_quant", None)) for _, m in nnx.iter_modules(model)}
    if any(issubclass(t, _FAKE_TYPES) for t in types) and not any(issubclass(t, _INTEGER_TYPES) for t in types):
        raise ValueError("export_onnx got a fake-quantized model (quant.quantize_model), whose weights are float "
                         "values on a grid; convert it first: imodel, report = quant.to_integer_model(qmodel); "
                         "export_onnx(imodel, path) stores int8 weights and runs int8 matmuls")


# ----------------------------------------------------------------------------- sites
def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _float_linear(g: Graph, x: str, w: np.ndarray, b, hint: str, key) -> str:
    y = g.op("MatMul", [x, g.weight(_f32(w), hint + ".kernel", key=(key, "kernel"))], hint + ".matmul")
    if b is None:
        return y
    return g.op("Add", [y, g.weight(_f32(b), hint + ".bias", key=(key, "bias"))], hint + ".out")


def _fake_input(g: Graph, qm, x: str, ndim: int, hint: str) -> str:
    return x if qm is None else OQ.dequantized(g, OQ.activation_codes(g, qm, x, ndim, hint + ".in"), hint + ".in")


def linear(g: Graph, mod, x: str, ndim: int, hint: str, report: list) -> str:
    """The Linear-like module ``mod`` applied to ``x`` (``ndim``-d); quantized sites add a report row."""
    key = id(mod)
    bias = None if getattr(mod, "bias", None) is None else mod.bias[...]
    if isinstance(mod, nnx.Linear):
        return _float_linear(g, x, mod.kernel[...], bias, hint, key)
    if isinstance(mod, S.StaticLinear):
        y, note = QDQ.static_linear(g, mod, x, hint, key)
        report.extend((site, QDQ_FORM, note) for site in mod.sites)
        return y
    site = getattr(mod, "site", hint)
    if isinstance(mod, I.IntLinear) and not mod.group_size:
        report.append((site, "int8 MatMulInteger", f"W{mod.w_bits} A{mod.a_bits}"))
        return OQ.int8_linear(g, mod, x, ndim, hint, key)
    if isinstance(mod, I.IntLinear):  # group scales: codes [G, g, out] * scales [G, out]
        codes, scale = np.asarray(mod.w_codes[...], np.float32), _f32(mod.w_scale[...])
        w, why = (codes * scale[:, None, :]).reshape(-1, codes.shape[-1]), f"group-wise scales (g={mod.group_size})"
    elif isinstance(mod, I.IntSplitLinear):
        d, s, n = np.asarray(mod.w_codes[...], np.float32), _f32(mod.w_scales[...]), mod.out_features
        w, why = d[:, :n] * s[0] + d[:, n:] * s[1], "ternary split halves summed"
    elif isinstance(mod, I.DequantLinear):
        w = _f32(dequantize_weight(mod.quantizer, mod.codes[...], mod.scale[...],
                                   None if mod.zero_point is None else mod.zero_point[...],
                                   None if mod.offset is None else mod.offset[...]))
        why = "weight-only site (float input)"
    elif isinstance(mod, M.QuantLinear):
        w = _f32(mod.kernel[...] if mod.weight_quant is None else mod.weight_quant(mod.kernel[...]))
        why = "kept fake-quantized by the integer conversion"
    else:
        raise ValueError(f"export_onnx: no ONNX mapping for the {type(mod).__name__} at {site}; supported: "
                         "nnx.Linear and the integer model's sites (merge adapters / factorisations first)")
    report.append((site, "float (dequantized)", why))
    return _float_linear(g, _fake_input(g, getattr(mod, "input_quant", None), x, ndim, hint), w, bias, hint, key)


def embed(g: Graph, mod, ids: str, hint: str, report: list) -> str:
    """Rows ``ids`` of the embedding module ``mod`` (float32)."""
    if isinstance(mod, nnx.Embed):
        return g.op("Gather", [g.weight(_f32(mod.embedding[...]), hint + ".table", key=id(mod)), ids], hint)
    site = getattr(mod, "site", hint)
    if (isinstance(mod, I.IntEmbed) and mod.zero_point is None and mod.offset is None
            and (mod.quantizer.signed or mod.quantizer.method in ("twn", "bwn"))):
        report.append((site, "int8 table", f"{mod.quantizer.name}: rows gathered then scaled"))
        codes = g.op("Gather", [g.weight(np.asarray(mod.codes[...], np.int8), hint + ".codes", key=id(mod)), ids],
                     hint + ".rows")
        scale = g.weight(_f32(mod.scale[...]), hint + ".scale", key=(id(mod), "scale"))
        if mod.rowwise:
            scale = g.op("Gather", [scale, ids], hint + ".row_scale")
        return g.op("Mul", [scale, g.op("Cast", [codes], hint + ".rows_f", to=OQ.FLOAT)], hint)
    if isinstance(mod, (I.IntEmbed, I.IntSplitEmbed, M.QuantEmbed)):
        report.append((site, "float (dequantized)", "embedding table without a plain int8 x scale form"))
        return g.op("Gather", [g.weight(_f32(mod.table()), hint + ".table", key=id(mod)), ids], hint)
    raise ValueError(f"export_onnx: no ONNX mapping for the embedding module {type(mod).__name__} at {site}")


def layer_norm(g: Graph, mod: nnx.LayerNorm, x: str, hint: str) -> str:
    if not isinstance(mod, nnx.LayerNorm) or mod.scale is None or mod.bias is None:
        raise ValueError(f"export_onnx: {hint} is not an nnx.LayerNorm with scale and bias")
    scale = g.weight(_f32(mod.scale[...]), hint + ".scale", key=(id(mod), "scale"))
    bias = g.weight(_f32(mod.bias[...]), hint + ".bias", key=(id(mod), "bias"))
    return g.op("LayerNormalization", [x, scale, bias], hint, axis=-1, epsilon=float(mod.epsilon))


def activation(g: Graph, name: str, x: str, hint: str) -> str:
    """`bert.activation` as ops."""
    if name == "gelu":
        # Div by sqrt(2): the pattern ONNX Runtime's GeluFusion turns into one Gelu (BiasGelu) kernel
        erf = g.op("Erf", [g.op("Div", [x, g.const(math.sqrt(2.0))], hint + ".scaled")], hint + ".erf")
        inner = g.op("Add", [erf, g.const(1.0)], hint + ".one_plus")
    elif name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        cube = g.op("Mul", [g.op("Mul", [x, x], hint + ".sq"), x], hint + ".cube")
        poly = g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715)], hint + ".c3")], hint + ".poly")
        tanh = g.op("Tanh", [g.op("Mul", [poly, g.const(math.sqrt(2.0 / math.pi))], hint + ".arg")], hint + ".tanh")
        inner = g.op("Add", [tanh, g.const(1.0)], hint + ".one_plus")
    elif name == "relu":
        return g.op("Relu", [x], hint)
    elif name in ("silu", "swish"):
        return g.op("Mul", [x, g.op("Sigmoid", [x], hint + ".sigmoid")], hint)
    elif name == "tanh":
        return g.op("Tanh", [x], hint)
    else:
        raise ValueError(f"export_onnx: activation {name!r} has no ONNX mapping")
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5)], hint + ".half"), inner], hint)


# ----------------------------------------------------------------------------- the encoder
def _embeddings(g: Graph, model, ids: str, types: str, report: list) -> str:
    emb = F.get_module(model, F.embeddings_path(model))
    p = F.embeddings_path(model)
    x = embed(g, emb.word_embeddings, ids, p + ".word", report)
    if emb.padded_positions:
        real = g.op("Cast", [g.op("Not", [g.op("Equal", [ids, g.const(emb.pad_token_id, np.int64)], p + ".is_pad")],
                                  p + ".is_real")], p + ".real", to=INT64)
        counted = g.op("Mul", [g.op("CumSum", [real, g.const(1, np.int64)], p + ".cumsum"), real], p + ".counted")
        positions = g.op("Add", [counted, g.const(emb.pad_token_id, np.int64)], p + ".position_ids")
    else:
        positions = None  # the first seq rows of the table: Slice, no ids
    if positions is None and isinstance(emb.position_embeddings, nnx.Embed):
        seq = g.op("Shape", [ids], p + ".seq_len", start=1, end=2)  # [1]
        table = g.weight(_f32(emb.position_embeddings.embedding[...]), p + ".position.table",
                         key=id(emb.position_embeddings))
        pos = g.op("Slice", [table, g.const([0], np.int64), seq, g.const([0], np.int64)], p + ".position")
    else:
        if positions is None:
            seq = g.op("Squeeze", [g.op("Shape", [ids], p + ".seq_len", start=1, end=2), g.const([0], np.int64)],
                       p + ".seq")
            positions = g.op("Range", [g.const(0, np.int64), seq, g.const(1, np.int64)], p + ".position_ids")
        pos = embed(g, emb.position_embeddings, positions, p + ".position", report)
    x = g.op("Add", [x, pos], p + ".sum")
    if emb.token_type_embeddings is not None:
        x = g.op("Add", [x, embed(g, emb.token_type_embeddings, types, p + ".token_type", report)], p + ".sum")
    x = layer_norm(g, emb.layer_norm, x, p + ".layer_norm")
    return x if emb.project is None else linear(g, emb.project, x, 3, p + ".project", report)


def _heads(g: Graph, y: str, n: int, d: int, hint: str, perm) -> str:
    """[B,T,N*D] -> Transpose(Reshape([B,T,N,D]), perm)."""
    return g.op("Transpose", [g.op("Reshape", [y, g.const([0, 0, n, d], np.int64)], hint + ".split")], hint,
                perm=list(perm))


def _attention(g: Graph, model, i: int, x: str, bias: str, report: list) -> str:
    path = F.attention_path(model, i)
    att = F.get_module(model, path)
    if isinstance(att, S.StaticAttention):  # one [H, 3W] product, split into q / k / v
        d = att.head_dim
        widths = att.qkv.out_features
        n, kv_heads = widths[0] // d, widths[1] // d
        qkv = linear(g, att.qkv, x, 3, path + ".qkv", report)
        projections = g.op("Split", [qkv, g.const(list(widths), np.int64)], path + ".qkv_split", outputs=3, axis=-1)
    else:
        layout = F.head_layout(model, i)
        n, d, kv_heads = layout.num_heads, layout.head_dim, layout.num_kv_heads
        projections = [linear(g, getattr(att, name), x, 3, f"{path}.{name}", report)
                       for name in ("query", "key", "value")]
    if kv_heads != n:
        raise ValueError(f"export_onnx: layer {i} has {kv_heads} key/value heads for {n} query heads; "
                         "the encoder export expects one per query head")
    q, k, v = (_heads(g, y, n, d, f"{path}.{name}", (0, 2, 1, 3)) for y, name in zip(projections, "qkv"))
    mq = att.matmul_quant
    if isinstance(mq, I.IntAttention):
        report.append((mq.site, "int8 MatMulInteger", "q.k^T and probs.v"))
        qk = OQ.int_scores(g, mq, q, k, path)
    elif mq is None:
        qk = g.op("MatMul", [q, g.op("Transpose", [k], path + ".kT", perm=[0, 1, 3, 2])], path + ".qk")
    elif isinstance(mq, M.AttentionQuant) and not mq.fold_v():
        report.append((mq.site, "float (fake-quant)", "attention operands fake-quantized, float matmuls"))
        kq = _fake_input(g, mq.k, k, 4, path + ".k")
        qk = g.op("MatMul", [_fake_input(g, mq.q, q, 4, path + ".q"),
                             g.op("Transpose", [kq], path + ".kT", perm=[0, 1, 3, 2])], path + ".qk")
    else:
        raise ValueError(f"export_onnx: no ONNX mapping for the attention hook {type(mq).__name__} at {path}")
    scores = g.op("Mul", [qk, g.const(1.0 / math.sqrt(d))], path + ".scores")
    probs = g.op("Softmax", [g.op("Add", [scores, bias], path + ".masked")], path + ".probs", axis=-1)
    if isinstance(mq, I.IntAttention):
        context = OQ.int_context(g, mq, probs, v, path)
    elif mq is None:
        context = g.op("MatMul", [probs, v], path + ".pv")
    else:
        p = probs
        if mq.probs is not None:  # exact zeros stay 0 (AttentionQuant.quantized_probs)
            zero = g.op("Equal", [probs, g.const(0.0)], path + ".p_zero")
            p = g.op("Where", [zero, g.const(0.0), _fake_input(g, mq.probs, probs, 4, path + ".p")], path + ".p_q")
        context = g.op("MatMul", [p, _fake_input(g, mq.v, v, 4, path + ".v")], path + ".pv")
    merged = g.op("Reshape", [g.op("Transpose", [context], path + ".context_t", perm=[0, 2, 1, 3]),
                              g.const([0, 0, n * d], np.int64)], path + ".context")
    out = linear(g, att.output, merged, 3, path + ".output", report)
    return layer_norm(g, att.layer_norm, g.op("Add", [out, x], path + ".residual"), path + ".layer_norm")


def _ffn(g: Graph, model, i: int, x: str, report: list) -> str:
    path = F.layer_path(model, i) + ".ffn"
    ffn = F.get_module(model, path)
    inner = activation(g, ffn.hidden_act, linear(g, ffn.intermediate, x, 3, path + ".intermediate", report),
                       path + ".act")
    out = linear(g, ffn.output, inner, 3, path + ".output", report)
    return layer_norm(g, ffn.layer_norm, g.op("Add", [out, x], path + ".residual"), path + ".layer_norm")


def _classifier(g: Graph, model, h: str, report: list) -> str:
    first = g.op("Squeeze", [g.op("Slice", [h, g.const([0], np.int64), g.const([1], np.int64),
                                            g.const([1], np.int64)], "first_token.slice"),
                             g.const([1], np.int64)], "first_token")  # [B, H]
    if model.pre_classifier is None:
        pooler = model.backbone.pooler
        pooled = g.op("Tanh", [linear(g, pooler.dense, first, 2, model.config.model_type + ".pooler.dense", report)],
                      "pooled")
    else:
        pre = linear(g, model.pre_classifier, first, 2, "pre_classifier", report)
        pooled = activation(g, model.config.traits.classifier_act, pre, "pre_classifier.act")
    return linear(g, model.classifier, pooled, 2, "classifier", report)


def build_graph(model, *, batch=None, seq=None, opset: int = 17):
    """``(onnx.ModelProto, ExportReport)`` of ``model`` (see the module docstring)."""
    onnx = _onnx()
    if opset < 17:
        raise ValueError(f"export_onnx needs opset >= 17 (LayerNormalization), got {opset}")
    if isinstance(model, S.StaticInt8):
        model = model.model
    check_exportable(model)
    g, report = Graph(opset), []
    ids, mask, types = (g.name(n) for n in ("input_ids", "attention_mask", "token_type_ids"))
    allowed = g.op("Greater", [mask, g.const(0, np.int64)], "mask.keep")
    bias = g.op("Unsqueeze", [g.op("Where", [allowed, g.const(0.0), g.const(B.MASK_VALUE)], "mask.bias_2d"),
                              g.const([1, 2], np.int64)], "mask.bias")          # [B,1,1,T]
    h = _embeddings(g, model, ids, types, report)
    for i in range(F.num_layers(model)):
        h = _ffn(g, model, i, _attention(g, model, i, h, bias, report), report)
    g.op("Identity", [_classifier(g, model, h, report)], "logits")  # the first tensor named "logits"
    dims = [batch if batch is not None else "batch", seq if seq is not None else "sequence"]
    inputs = [onnx.helper.make_tensor_value_info(name, INT64, dims) for name in (ids, mask, types)]
    outputs = [onnx.helper.make_tensor_value_info("logits", OQ.FLOAT, [dims[0], model.config.num_labels])]
    result = ExportReport(report)
    proto = g.model(inputs, outputs, opset=opset, name=type(model).__name__,
                    doc=f"{F.family_of(model).name} sequence classifier exported by efficient_nlp",
                    metadata={REPORT_KEY: str(result)})
    return proto, result


def export_onnx(model, path, *, batch=None, seq=None, opset: int = 17, verbose: bool = False) -> str:
    """Write ``model`` to ``path`` as ONNX; returns the path.  The form follows the model's type:

    * a float encoder sequence classifier: float ops (``MatMul``);
    * ``quant.to_integer_model`` output (ranges computed per token / per example): the range
      reductions and the quantization as ops, then ``MatMulInteger`` on int8 weights
      (report form ``int8 MatMulInteger``);
    * ``quant.to_static_int8`` output (the `StaticInt8` tuple or its ``.model``; static
      PACT / LSQ scales): QDQ -- ``QuantizeLinear`` -> ``DequantizeLinear`` on each activation,
      ``DequantizeLinear`` on int8 weight initializers (per output column), float ``MatMul``,
      which ONNX Runtime's optimizer fuses into ``MatMulIntegerToFloat`` (report form
      ``int8 QDQ MatMul``; `onnx_qdq`);

    sites of any model without an integer form run float ops on dequantized weights (report
    form ``float ...``).  ``batch`` / ``seq``: fixed sizes of the input axes (None: dynamic).
    The model is checked with ``onnx.checker``; the site report (the form per quantized site)
    is stored in the file's metadata (`export_report`), and printed when ``verbose`` or when
    some quantized site fell back to a dequantized float weight."""
    onnx = _onnx()
    proto, report = build_graph(model, batch=batch, seq=seq, opset=opset)
    onnx.checker.check_model(proto)
    path = os.fspath(path)
    onnx.save_model(proto, path)
    if verbose or report.float_fallbacks:
        print(report)
    return path


def export_report(path) -> str:
    """The site report stored in an exported file's metadata ("" when there is none)."""
    model = _onnx().load_model(os.fspath(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == REPORT_KEY), "")


__all__ = ["ExportReport", "build_graph", "check_exportable", "export_onnx", "export_report"]
