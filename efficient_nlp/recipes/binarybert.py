"""BinaryBERT: half-width ternary QAT -> ternary weight splitting -> binary fine-tuning, next to a
BWN baseline trained directly (docs/binarybert.md).

    python train.py --config configs/binarybert_1_1_8.py --workdir runs/binarybert_1_1_8

``config.binarybert.method`` picks ``"tws"``, ``"bwn"`` or ``"tws,bwn"`` (both, side by side).

TWS (``workdir/tws``):
1. Half-width model: the fine-tuned full-precision teacher (``config.teacher_dir``; empty =
   fine-tune first, as the distill recipe does) keeps ``config.binarybert.width`` of the heads and
   of the FFN neurons of every layer, the highest-scoring by ``config.binarybert.score``
   (``magnitude``: ``sum |w|`` of the unit's weights, or ``taylor``: ``sum |w * grad|`` over a few
   batches; `efficient_nlp.prune.unit_scores`), physically removed with `efficient_nlp.prune.shrink`.
2. Ternary QAT: TWN weights and embeddings with ``config.quant`` activations (W-E-A ``2-2-a``),
   the stages ``config.distill.stages`` (TernaryBERT's two stages; attention scores cannot be
   matched when head counts differ, so stage 1 matches embeddings, MHA and FFN outputs).
3. `efficient_nlp.quant.split_model`: every ternary matrix -> two binary halves (full width, the
   same function); then ``config.binarybert.finetune_steps`` of prediction-layer distillation.

BWN (``workdir/bwn``): the full-width teacher quantized at ``1-1-a`` and trained with the same
stages for the same total number of steps (the split fine-tuning steps are added to the last,
prediction-layer stage).

Output: a table like BinaryBERT's Table 5.2 (dev metrics, W-E-A, parameters, stored and packed
size in MB, BOPs) for full precision, the half-width ternary model, the split model before and
after fine-tuning and the BWN baseline; ``results.json``; packed artefacts ``workdir/<row>/packed``
(the TWS model's is ``workdir/tws/packed``).
"""
from __future__ import annotations

import math
import os

import numpy as np

from efficient_nlp import models
from efficient_nlp import prune
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.distill.matches import ATTENTION_FEATURES
from efficient_nlp.recipes.common import check_stages, default_dir, run_kd_stages, teacher_and_task
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.recipes.qat import quantized_student

METHODS = ("tws", "bwn")
SCORES = ("magnitude", "taylor")
ROWS = (("full_precision", "full precision"), ("half_width_ternary", "half-width ternary"),
        ("tws_split", "TWS split, before FT"), ("tws", "TWS after FT"), ("bwn", "BWN baseline"))
PREDICTION = [dict(feature="logits", loss="soft_ce", temperature=1.0)]


# ----------------------------------------------------------------------------- pure pieces
def parse_methods(value) -> tuple[str, ...]:
    """``"tws,bwn"`` -> ``("tws", "bwn")``; an unknown or empty method list is a ValueError."""
    names = tuple(s.strip() for s in str(value).split(",") if s.strip())
    bad = [n for n in names if n not in METHODS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"config.binarybert.method={value!r}: give 'tws', 'bwn' or 'tws,bwn'")
    return names


def half_width_structure(scores, width: float = 0.5) -> dict:
    """The `efficient_nlp.prune.shrink` structure keeping, in every layer, the ``round(width * n)``
    (at least 1) highest-scoring heads and FFN neurons; ``scores`` as from `prune.unit_scores`
    (``{"heads": [per layer [N]], "neurons": [per layer [I]]}``).  Ties keep the lower index."""
    if not 0 < width <= 1:
        raise ValueError(f"config.binarybert.width={width!r}: the kept fraction must be in (0, 1]")

    def top(s):
        s = np.asarray(s, np.float64)
        k = max(1, int(round(width * s.size)))
        return sorted(int(i) for i in np.argsort(-s, kind="stable")[:k])

    return {"layers": list(range(len(scores["heads"]))),
            "heads": [top(s) for s in scores["heads"]],
            "neurons": [top(s) for s in scores["neurons"]]}


def half_width_model(teacher, width=0.5, score="magnitude", batches=None, seed=0):
    """``(smaller model, structure)``: ``teacher`` with ``width`` of its heads and FFN neurons
    per layer (`half_width_structure` of the ``score`` unit scores), removed by `prune.shrink`."""
    if score not in SCORES:
        raise ValueError(f"config.binarybert.score={score!r}; valid: {SCORES}")
    element = None
    if score == "taylor":
        from efficient_nlp.recipes.finetune import task_loss
        element = prune.taylor_scores(teacher, task_loss, batches, seed=seed)
    st = half_width_structure(prune.unit_scores(teacher, element), width)
    return prune.shrink(teacher, structure=st)


def bwn_stages(stages, finetune_steps: int) -> list[dict]:
    """The baseline's stages: ``stages`` with ``finetune_steps`` added to the last one, so the
    baseline trains as many steps as the TWS pipeline (ternary stages + split fine-tuning)."""
    out = [dict(s) for s in stages]
    out[-1]["num_steps"] = int(out[-1]["num_steps"]) + int(finetune_steps)
    return out


def specs(config):
    """``(ternary 2-2-a spec, binary 1-1-a spec)`` from ``config.quant`` (activation bits, method
    and rules; the weight bits are set here)."""
    q = {k: v for k, v in config.quant.to_dict().items() if k not in ("w_bits", "e_bits")}
    return (quant.spec_from_config(dict(q, w_bits=2, e_bits=2)),
            quant.spec_from_config(dict(q, w_bits=1, e_bits=1)))


def check_config(config):
    """Everything that can fail before training: methods, specs, width, score and every stage's
    matches against the half-width (TWS) or full-width (BWN) student."""
    bb = config.binarybert
    methods = parse_methods(bb.method)
    tern_spec, bin_spec = specs(config)
    if bb.score not in SCORES:
        raise ValueError(f"config.binarybert.score={bb.score!r}; valid: {SCORES}")
    if int(bb.finetune_steps) < 0:
        raise ValueError(f"config.binarybert.finetune_steps={bb.finetune_steps!r} must be >= 0")
    teacher_cfg = models.config_from_pretrained(default_dir(config))
    n, i = teacher_cfg.num_attention_heads, teacher_cfg.intermediate_size
    layers = teacher_cfg.num_hidden_layers
    st = half_width_structure({"heads": [np.zeros(n)] * layers, "neurons": [np.zeros(i)] * layers}, bb.width)
    half_cfg = prune.shrunk_config(teacher_cfg, st)
    stages = list(config.distill.stages)
    for stage in stages:
        for m in stage["matches"]:
            if "tws" in methods and m["feature"] in ATTENTION_FEATURES + ("values",) \
                    and m["loss"] != "relation_kl" and bb.width < 1:
                raise ValueError(f"config.distill.stages[{stage['name']!r}]: {m['feature']} cannot be matched "
                                 f"one head to one between the half-width student and the teacher; match "
                                 f"embedding / mha_out / ffn_out (or use relation_kl)")
    checked = {"tws": check_stages(stages, half_cfg, teacher_cfg, "config.distill.stages"),
               "bwn": check_stages(stages, teacher_cfg, teacher_cfg, "config.distill.stages"),
               "finetune": check_stages([finetune_stage(config)], teacher_cfg, teacher_cfg, "finetune")}
    return methods, tern_spec, bin_spec, checked


def finetune_stage(config) -> dict:
    """The split model's prediction-layer distillation stage (soft cross-entropy, T = 1)."""
    bb = config.binarybert
    return dict(name="finetune", num_steps=int(bb.finetune_steps), learning_rate=float(bb.finetune_learning_rate),
                matches=PREDICTION, hard_label_weight=0.0)


# ----------------------------------------------------------------------------- the run
def _row(metrics, cost, packed_dir=None):
    row = dict(metrics, **cost.summary(), bits=cost.spec_bits)
    if packed_dir is not None:
        row["packed_mb"] = quant.packed_size_mb(packed_dir)
    return row


def _last(stages):
    """The dev metrics after the last of ``stages`` (`run_kd_stages` evaluates at each stage's end)."""
    return dict(list(stages.values())[-1])


def _export(model, out_dir):
    quant.save_packed(quant.export_packed(model), out_dir)
    return out_dir


def run(config, workdir):
    """Runs the selected pipelines; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    methods, tern_spec, bin_spec, checked = check_config(config)
    bb = config.binarybert
    teacher_dir, task, teacher, batches, eval_fn = teacher_and_task(config, workdir)
    sample = {k: v[:1] for k, v in task.dev.items()}
    rows = {"full_precision": _row(eval_fn(teacher), quant.cost_report(teacher, None, sample))}
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "bits": bin_spec.bits, "methods": list(methods),
               "rows": rows, "stages": {}}
    calibration = next(batches(0))
    if "tws" in methods:
        tws_dir = os.path.join(workdir, "tws")
        half, structure = half_width_model(teacher, bb.width, bb.score, batches(0), config.train.seed)
        results["half_width"] = {"heads": [len(h) for h in structure["heads"]],
                                 "neurons": [len(n) for n in structure["neurons"]],
                                 "structure": {k: [list(map(int, v)) if isinstance(v, (list, tuple)) else int(v)
                                                   for v in structure[k]] for k in ("layers", "heads", "neurons")},
                                 "fp_untrained": eval_fn(half)}
        tern, _ = quantized_student(half, tern_spec, calibration)
        results["half_width"]["ternary_untrained"] = eval_fn(tern)
        tern, stages = run_kd_stages(tern, teacher, config.distill.stages, checked["tws"], config, tws_dir,
                                     batches, eval_fn)
        rows["half_width_ternary"] = _row(_last(stages), quant.cost_report(half, tern_spec, sample),
                                          _export(tern, os.path.join(workdir, "half_width_ternary", "packed")))
        binary, split_report = quant.split_model(tern)
        print(split_report)
        split_cost = quant.cost_report(half, tern_spec, sample, split=True)
        split_metrics = eval_fn(binary)
        rows["tws_split"] = _row(split_metrics, split_cost)
        if int(bb.finetune_steps) > 0:
            binary, ft = run_kd_stages(binary, teacher, [finetune_stage(config)], checked["finetune"], config,
                                       tws_dir, batches, eval_fn)
            stages.update(ft)
            split_metrics = _last(ft)
        rows["tws"] = _row(split_metrics, split_cost, _export(binary, os.path.join(tws_dir, "packed")))
        results["stages"]["tws"] = stages
    if "bwn" in methods:
        bwn_dir = os.path.join(workdir, "bwn")
        student, _ = quantized_student(teacher, bin_spec, calibration)
        student, stages = run_kd_stages(student, teacher, bwn_stages(config.distill.stages, bb.finetune_steps),
                                        checked["bwn"], config, bwn_dir, batches, eval_fn)
        rows["bwn"] = _row(_last(stages), quant.cost_report(teacher, bin_spec, sample),
                           _export(student, os.path.join(bwn_dir, "packed")))
        results["stages"]["bwn"] = stages
    results["total_steps"] = sum(int(s["num_steps"]) for s in config.distill.stages) + int(bb.finetune_steps)
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def format_results(results) -> str:
    """Table 5.2-style: one line per model (dev metrics, W-E-A, params, size, packed size, BOPs)."""
    rows = results["rows"]
    keys = [k for k in rows["full_precision"] if k not in ("params", "size_mb", "flops", "bops", "bits")]
    lines = [f"Task {results['task']}: BinaryBERT {results['bits']} ({', '.join(results['methods'])}; "
             f"{results.get('total_steps', '?')} training steps each)",
             f"{'model':<22}{'W-E-A':>8}" + "".join(f"{k:>15}" for k in keys)
             + f"{'params M':>10}{'size MB':>9}{'packed MB':>10}{'BOPs G':>9}"]
    for name, label in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        packed = r.get("packed_mb", math.nan)
        lines.append(f"{label:<22}{r['bits']:>8}" + "".join(f"{r.get(k, np.nan):>15.4f}" for k in keys)
                     + f"{r['params'] / 1e6:>10.2f}{r['size_mb']:>9.2f}{packed:>10.2f}{r['bops'] / 1e9:>9.3f}")
    return "\n".join(lines)
