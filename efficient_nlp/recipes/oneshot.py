"""One-shot post-training compression side by side: RTN, GPTQ, AWQ, SmoothQuant, REM, MREM-S,
MREM-P and GPTQ + MREM at several weight / activation settings, and SparseGPT, Wanda and
magnitude pruning (docs/oneshot.md).

    python train.py --config configs/oneshot.py --workdir runs/oneshot          # fine-tuned MiniLM
    python train.py --config configs/lm_oneshot.py --workdir runs/lm_oneshot    # pre-trained decoder

1. Teacher: ``config.teacher_dir`` (empty: fine-tuned first, as the other compression recipes;
   for ``data.task="lm"`` the pre-trained decoder itself).
2. Calibration: ``config.oneshot.calibration_size`` training rows (seeded); nothing else of the
   training split is read.
3. For every setting in ``config.oneshot.settings`` (``w4g128``: 4-bit weights with one scale per
   128 inputs, activations in float; ``w3``, ``w2``: per output channel; ``w8a8``, ``w4a8``: also
   8-bit activations with static per-tensor ranges calibrated on the first calibration batch) and
   every method in ``config.oneshot.methods``: compress a copy of the teacher and evaluate it on
   the dev set.  REM / MREM rows start from the RTN model, ``gptq+mrem_s`` from the GPTQ one.
   Embeddings and the classifier stay in float (as in the one-shot literature).
4. Pruning rows: each of ``config.oneshot.prune`` at each of ``config.oneshot.sparsities``
   (``0.5`` unstructured, ``2:4``), plus ``sparsegpt+gptq`` (2:4 and 4-bit weights in one pass)
   when listed.
5. Output: a table per model (metric, fidelity to the teacher, packed size, compression seconds,
   peak resident memory), ``results.json``; each quantized model's packed artefact is written
   only with ``config.oneshot.save_packed`` (its size is measured either way).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import oneshot
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.quant import mrem, ptq
from efficient_nlp.quant.mrem_parallel import mrem_p
from efficient_nlp.recipes.common import is_lm, load_data, resolve_teacher
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.recipes.ptq import PeakMemory

QUANT_ROWS = ("rtn", "gptq", "awq", "smoothquant", "rem", "mrem_s", "mrem_p", "gptq+mrem_s", "awq+mrem_s")
PRUNE_ROWS = ("sparsegpt", "wanda", "magnitude", "sparsegpt+gptq")
_SETTING = re.compile(r"^w(\d)(?:g(\d+))?(?:a(\d+))?$")


@dataclasses.dataclass(frozen=True)
class Setting:
    """A weight / activation setting: ``w4g128`` = 4-bit weights, group size 128, float
    activations (W4A16); ``w8a8`` = 8-bit weights per output channel and 8-bit activations."""
    name: str
    w_bits: int
    group_size: int
    a_bits: int

    def spec(self, activation_method: str) -> quant.QuantSpec:
        """LSQ weight quantizers (one-shot methods write their scales into the step), embeddings
        in float, activations static (``activation_method``) or float."""
        kw = dict(weight_method="lsq", activation_method=activation_method)
        if self.group_size:
            kw.update(weight_granularity="group", weight_group_size=self.group_size)
        return quant.make_spec(self.w_bits, 32, self.a_bits, **kw)


def parse_setting(name: str) -> Setting:
    m = _SETTING.match(name.strip().lower())
    if not m:
        raise ValueError(f"unknown one-shot setting {name!r}; write w<bits>[g<group size>][a<bits>], "
                         "e.g. w4g128 (weight-only, groups of 128), w3, w8a8, w4a8")
    w, g, a = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 16)
    if not 2 <= w <= 8:
        raise ValueError(f"setting {name!r}: weight bits must be 2..8, got {w}")
    if a < 16 and not 2 <= a <= 8:
        raise ValueError(f"setting {name!r}: activation bits must be 2..8 (or 16 = float), got {a}")
    return Setting(name.strip().lower(), w, g, 16 if a >= 16 else a)


def _list(value, valid, what) -> list[str]:
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise ValueError(f"config.oneshot.{what}: unknown {bad}; valid: {valid} (comma-separated)")
    return names


def parse_sparsity(value: str):
    """``"0.5"`` -> ``(0.5, None)``; ``"2:4"`` -> ``(0.5, (2, 4))``: N of every M consecutive inputs
    kept (the convention of `efficient_nlp.prune.n_m` and of sparse tensor cores)."""
    value = str(value).strip()
    if ":" in value:
        n, m = (int(x) for x in value.split(":"))
        if not 0 < n < m:
            raise ValueError(f"sparsity pattern {value!r}: need 0 < N < M in N:M")
        return 1.0 - n / m, (n, m)
    s = float(value)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity {value!r} must be in [0, 1) or an N:M pattern like 2:4")
    return s, None


def check_config(config):
    o = config.oneshot
    settings = [parse_setting(s) for s in str(o.settings).split(",") if s.strip()]
    methods = _list(o.methods, QUANT_ROWS, "methods")
    pruners = _list(o.prune, PRUNE_ROWS, "prune")
    sparsities = [parse_sparsity(s) for s in str(o.sparsities).split(",") if s.strip()]
    if not isinstance(o.calibration_size, int) or o.calibration_size < 1:
        raise ValueError(f"config.oneshot.calibration_size must be a positive int, got {o.calibration_size!r}")
    return settings, methods, pruners, sparsities


def run(config, workdir):
    """Runs the comparison; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    settings, methods, pruners, sparsities = check_config(config)
    o = config.oneshot
    teacher_dir = resolve_teacher(config, workdir)
    task = load_data(config, teacher_dir)
    teacher = models.from_pretrained(teacher_dir, num_labels=task.spec.num_labels)
    calib, rows = ptq.calibration_set(task.train, int(o.calibration_size), seed=int(o.seed))
    train_size = len(task.train["input_ids"])
    task.train = None
    bs = config.train.eval_batch_size

    def metric_fn(predictions, labels, weights):
        return data_lib.compute_metrics(task.spec, predictions, labels, weights)

    eval_fn = distill.make_fidelity_eval_fn(task.dev, bs, metric_fn, train_lib.predict(teacher, task.dev, bs))
    first = {k: v[: min(int(o.batch_size), len(rows))] for k, v in calib.items()}
    pass_kw = dict(batch_size=int(o.batch_size), log=None)
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "kind": "lm" if is_lm(config) else "encoder",
               "calibration": {"size": int(len(rows)), "train_size": int(train_size), "seed": int(o.seed)},
               "full_precision": eval_fn(teacher), "float_mb": _float_mb(teacher), "quant": {}, "prune": {}}
    print(f"one-shot compression of {teacher_dir}: {len(settings)} settings x {len(methods)} methods, "
          f"{len(pruners)} pruning methods x {len(sparsities)} sparsities")

    def record(table, key, name, fn):
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            model, extra = fn()
        seconds = time.perf_counter() - t0
        row = {"metrics": eval_fn(model), "seconds": seconds, "peak_rss_mb": memory.summary()["rss_peak_mb"], **extra}
        table.setdefault(key, {})[name] = row
        print(f"  {key:>8} {name:<14} {_metric_text(row['metrics'])}  {seconds:6.1f}s")
        return model

    for setting in settings:
        spec = setting.spec(str(o.activation_method))
        base = {}

        def quantized(float_model):
            qmodel, _ = quant.quantize_model(float_model, spec)
            if setting.a_bits < 16:
                quant.calibrate(qmodel, first)
            return qmodel

        def one(method, float_model=teacher, key=None, **kw):
            """``method`` (rtn / gptq) on ``float_model``; kept as this setting's start ``key``."""
            result = oneshot.quantize(quantized(float_model), calib, method=method, act_order=bool(o.act_order),
                                      damp=float(o.damp), **pass_kw)
            base[key or method] = result.model
            return result.model, {"packed_mb": _packed_mb(result.model, workdir, o, setting.name, key or method),
                                  "layer_error": _mean(result.report, "error"),
                                  "rtn_layer_error": _mean(result.report, "rtn_error"), **kw}

        def smoothed(method):
            sm = oneshot.smooth(teacher, calib, method=method, alpha=float(o.smoothquant_alpha),
                                bits=setting.w_bits, group_size=setting.group_size, **pass_kw)
            done = sum(r["smoothed"] for r in sm.report)
            return one("rtn", sm.model, key=method, smoothed_sites=done, sites=len(sm.report))

        def reconstructed(name, start, row):
            kw = dict(num_modules=int(o.mrem.num_modules), steps=int(o.mrem.steps),
                      learning_rate=float(o.mrem.learning_rate), batch_size=int(o.batch_size), eval_batch_size=bs,
                      seed=int(o.seed))
            if name == "rem":
                out = ptq.rem(start, teacher, calib, steps=int(o.rem_steps), eval_batch_size=bs, seed=int(o.seed),
                              log=None)
            elif name == "mrem_s":
                out = mrem.mrem_s(start, teacher, calib, log=None, **kw)
            else:
                out = mrem_p(start, teacher, calib, **kw)
            return out.model, {"packed_mb": _packed_mb(out.model, workdir, o, setting.name, row)}

        for name in methods:
            if name in ("rtn", "gptq"):
                record(results["quant"], setting.name, name, lambda: one(name))
            elif name in ("awq", "smoothquant"):
                record(results["quant"], setting.name, name, lambda: smoothed(name))
            else:
                init, _, rec = name.partition("+")
                init, rec = ("rtn", init) if not rec else (init, rec)
                start = _start(init, base, one, smoothed)
                record(results["quant"], setting.name, name, lambda: reconstructed(rec, start, name))

    for sparsity, n_m in sparsities:
        key = f"{n_m[0]}:{n_m[1]}" if n_m else f"{sparsity:g}"
        for name in pruners:
            def pruned():
                if name == "sparsegpt+gptq":
                    spec = parse_setting(str(o.prune_bits)).spec(str(o.activation_method))
                    model = quant.quantize_model(teacher, spec)[0]
                    result = oneshot.prune(model, calib, method="sparsegpt", sparsity=sparsity, n_m=n_m,
                                           damp=float(o.damp), **pass_kw)
                else:
                    result = oneshot.prune(teacher, calib, method=name, sparsity=sparsity, n_m=n_m,
                                           damp=float(o.damp), **pass_kw)
                return result.model, {"density": _mean(result.report, "density"),
                                      "layer_error": _mean(result.report, "error")}
            record(results["prune"], key, name, pruned)

    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def _start(init, base, one, smoothed):
    """The model REM / MREM start from: the RTN (or GPTQ / AWQ) model of this setting, made now
    unless its own row made it already."""
    if init not in base:
        smoothed(init) if init == "awq" else one(init)
    return base[init]


def _mean(report, key):
    values = [r[key] for r in report if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _float_mb(model) -> float:
    """float32 size of the model's parameters."""
    return sum(int(np.size(x)) * 4 for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 2**20


def packed_dir(workdir: str, setting: str, row: str) -> str:
    """Where a quantized row's packed artefact is kept with ``config.oneshot.save_packed``."""
    return os.path.join(workdir, setting, row.replace("+", "_"))


def _packed_mb(qmodel, workdir, o, setting, row) -> float:
    """Size on disk of the packed integer artefact of table row ``row`` (kept under
    `packed_dir` with ``config.oneshot.save_packed``, else written to a temporary directory and
    measured)."""
    artifact = quant.export_packed(qmodel)
    if o.save_packed and train_lib.is_main_process():
        out = packed_dir(workdir, setting, row)
        quant.save_packed(artifact, out)
        return quant.packed_size_mb(out)
    with tempfile.TemporaryDirectory() as tmp:
        quant.save_packed(artifact, tmp)
        return quant.packed_size_mb(tmp)


def _metric_text(metrics) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("accuracy", "perplexity", "f1", "loyalty"))


def format_results(results) -> str:
    keys = [k for k in results["full_precision"] if k in ("accuracy", "perplexity", "f1", "matthews", "loyalty")]
    head = f"{'setting':<9}{'method':<16}" + "".join(f"{k:>12}" for k in keys) + f"{'size MB':>10}{'seconds':>9}{'peak MB':>9}"
    lines = [f"Task {results['task']}: one-shot compression, calibration {results['calibration']['size']} of "
             f"{results['calibration']['train_size']} training rows", head,
             f"{'fp32':<9}{'full precision':<16}" + "".join(f"{results['full_precision'].get(k, np.nan):>12.4f}" for k in keys)
             + f"{results['float_mb']:>10.2f}"]
    for table, size_key in (("quant", "packed_mb"), ("prune", "density")):
        for setting, rows in results[table].items():
            for name, r in rows.items():
                size = r.get(size_key)
                lines.append(f"{setting:<9}{name:<16}" + "".join(f"{r['metrics'].get(k, np.nan):>12.4f}" for k in keys)
                             + (f"{size:>10.2f}" if size is not None else f"{'':>10}")
                             + f"{r['seconds']:>9.1f}{r['peak_rss_mb']:>9.0f}")
    lines.append("size MB: packed integer artefact on disk (quantization rows); density of kept weights (pruning rows)")
    return "\n".join(lines)
