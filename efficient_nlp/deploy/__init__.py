"""Deployment: ONNX export of our models and ONNX Runtime helpers.

    from efficient_nlp import deploy
    path = deploy.export_onnx(model, "model.onnx")   # float, quant.to_integer_model(qmodel)[0] or
                                                     # quant.to_static_int8(model, batch) (QDQ form)
    sess = deploy.ort_session(path, threads=2)
    logits, = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    deploy.quantize_dynamic_onnx(path, "model.ort_int8.onnx")   # ONNX Runtime's own dynamic int8
    deploy.optimized_model(path, "model.opt.onnx")               # what ONNX Runtime runs after its fusions

The exporter writes the graph op by op from the model's family layout (`onnx_export`); integer
models run ``MatMulInteger`` on int8 weights (`onnx_quant`); static int8 models are written as
QuantizeLinear / DequantizeLinear pairs around float MatMuls, which ONNX Runtime fuses into
``MatMulIntegerToFloat`` (`onnx_qdq`).  Needs the ``onnx`` package (and
``onnxruntime`` to run the result).
"""
from efficient_nlp.deploy.onnx_export import ExportReport, build_graph, check_exportable, export_onnx, export_report
from efficient_nlp.deploy.ort import optimized_model, ort_session, quantize_dynamic_onnx

__all__ = ["ExportReport", "build_graph", "check_exportable", "export_onnx", "export_report", "optimized_model",
           "ort_session", "quantize_dynamic_onnx"]
