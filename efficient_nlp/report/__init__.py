"""One-command reproduction report: every method against full precision, in two sections.

    python -m efficient_nlp.report --workdir runs/report --fast --teacher runs/quickstart/model
    python -m efficient_nlp.report --workdir runs/report --fast --section decoder

The encoder section runs, with fixed seeds, on the built-in task with the embedded
MiniLM-L6-H384 (or ``--model_dir``): full precision; QAT at W-E-A 4-4-8 / 2-2-8 / 1-1-8
(docs/quantization.md); PTQ by REM, MREM-S and MREM-P at 4-4-8 and 2-2-8 (docs/quantization.md);
BinaryBERT, BWN vs TWS (docs/binarybert.md); one-shot RTN / GPTQ / AWQ / SmoothQuant / GPTQ + MREM-S
at W4 g128 and W8A8 and SparseGPT / Wanda / magnitude at 2:4 (docs/oneshot.md); pruning, magnitude
vs movement at 90% and heads + FFN neurons at 50% with physical removal (docs/pruning.md); few-shot
pruning with and without cross distillation, one example per class (docs/cross_distillation.md); a
distilled 2-layer student (docs/distillation.md).  The decoder section compresses the pre-trained decoder
(`efficient_nlp.models.default_decoder_dir`, or ``--decoder``) with the configs/lm_*.py files and
reports held-out perplexity (lower is better) and token accuracy: full precision, QAT 4-4-8, PTQ
4-4-8 by REM and MREM-S, the one-shot rows at W4 g64 and W8A8 and 2:4, 50% key/value head groups + FFN neurons removed, 50% magnitude pruning
and a half-depth distilled student; without the decoder it is skipped, with the command that
creates it.  Every row is a recipe of `efficient_nlp.recipes` run on its config file from
``configs/`` with overrides (step counts, teacher, seed): no recipe logic lives here.

Each row's recipe writes its own ``results.json`` under ``workdir/<row key>/``; the report reads
it, then measures what the recipes do not report uniformly: size (bytes of the saved artefact:
the bit-packed file for quantized models, the float32 safetensors file otherwise), nonzero
parameters, FLOPs and BOPs (`efficient_nlp.quant.cost_report`, docs/quantization.md; per example,
per token for the decoder) and CPU latency of the saved model (`efficient_nlp.train.measure_latency`;
decoder rows per token, prefill and greedy decoding; quantized models through the int8 path
`efficient_nlp.quant.to_integer_model`).  A row whose recipe or method is not in this checkout is
reported as "not available" with the reason; a row that fails is reported with its error and the
others continue.  Writes ``rows.json``, a Markdown page with one table per section and a
metric-vs-size Pareto plot (PNG) per section.  ``--section`` runs one section and keeps the
other's table; ``--only`` reruns some rows and keeps the others' records; ``--remeasure`` redoes
only the measurements from the saved outputs (latency on a quiet machine).

Modules: ``rows`` (`Settings`, `Row`, `Experiment`, `Context` and the encoder rows,
`experiments`), ``decoder_rows`` (`DecoderContext` and the decoder rows, `decoder_experiments`),
``measure`` (running the recipes, in parallel with ``--jobs``, and measuring their outputs),
``render`` (tables, Pareto plots, page, ``rows.json``) and ``cli`` (`build_report`, `main`).
"""
from efficient_nlp.report import cli, decoder_rows, measure, render  # noqa: F401
from efficient_nlp.report.cli import SECTIONS, build_report, main
from efficient_nlp.report.decoder_rows import (LM_PTQ_METHODS, DecoderContext, decoder_experiments,
                                               decoder_fp_row, decoder_row_keys)
from efficient_nlp.report.rows import (BINARYBERT, DISTILL, PTQ_METHODS, Context, Experiment, Row, Settings,
                                       ensure_configs_importable, experiments, row_keys, teacher_config)
from efficient_nlp.report.measure import (full_precision_row, run_experiment, run_recipes_in_parallel,
                                          run_teacher)
from efficient_nlp.report.render import (COLUMNS, DECODER_COLUMNS, compose_page, environment,
                                         format_decoder_section, format_decoder_table, format_report,
                                         format_table, load_rows, pareto_front, plot_pareto, save_rows)

_ensure_configs_importable = ensure_configs_importable   # the name before the package split

__all__ = [
    "BINARYBERT", "COLUMNS", "DECODER_COLUMNS", "DISTILL", "LM_PTQ_METHODS", "PTQ_METHODS", "SECTIONS",
    "Context", "DecoderContext", "Experiment", "Row", "Settings", "build_report", "compose_page",
    "decoder_experiments", "decoder_fp_row", "decoder_row_keys", "ensure_configs_importable", "environment",
    "experiments", "format_decoder_section", "format_decoder_table", "format_report", "format_table",
    "full_precision_row", "load_rows", "main", "pareto_front", "plot_pareto", "row_keys", "run_experiment",
    "run_recipes_in_parallel", "run_teacher", "save_rows", "teacher_config",
]
