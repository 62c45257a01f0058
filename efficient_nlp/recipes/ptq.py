"""Post-training quantization by reconstruction: REM, MREM-S and MREM-P (docs/quantization.md).

    python train.py --config configs/ptq_2_2_8.py --workdir runs/ptq_2_2_8
    python train.py --config configs/ptq_2_2_8.py --workdir runs/ptq --config.ptq.method=rem,mrem_s,mrem_p \
        --config.ptq.qat_results=runs/qat/2_2_8/results.json

1. Teacher: the fine-tuned full-precision model (``config.teacher_dir``; empty = fine-tune
   ``config.model_dir`` first into ``workdir/teacher``, as the distill / QAT recipes do).
2. Calibration: ``config.ptq.calibration_size`` rows sampled (``config.ptq.seed``) from the
   training split (`efficient_nlp.quant.ptq.calibration_set`); the rest of the split is dropped
   before anything runs, the row indices are written to ``calibration_indices.json``.
3. The fake-quantized copy of the teacher (``config.quant``, as QAT), activation quantizers
   calibrated on the first calibration batch, then for every method in ``config.ptq.method``
   (comma-separated: ``rem``, ``mrem_s``, ``mrem_p``) a reconstruction starting from that same
   copy.  MREM-P places module n on device n (``config.ptq.mrem_p.placement``: explicit device
   indices, empty = round-robin over the local devices, several modules per device if too few).
4. Output: dev metrics of the full-precision model, the quantized model before reconstruction
   and after each method (with loyalty / KL to the teacher), wall time and peak memory of each
   method (`peak_memory`: the process's resident set size sampled every 20 ms while the method
   runs -- on CPU that includes every simulated device's buffers -- plus the accelerators' peak
   bytes in use where ``jax`` reports them, a process-lifetime high-water mark), the per-method
   reconstruction reports, the per-layer FFN-output MSE vs full precision on the dev set
   (``layer_errors.json`` and ``layer_errors.png``), size / BOPs, ``results.json``, and each
   method's packed integer model in ``workdir/<method>/quantized``.  With
   ``config.ptq.qat_results`` (a ``results.json`` of the ``qat`` recipe) the printed table also
   shows that QAT student, so FP, QAT, REM, MREM-S and MREM-P stand side by side.
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import quant
from efficient_nlp import train as train_lib
from efficient_nlp.quant import mrem, ptq
from efficient_nlp.quant.mrem_parallel import mrem_p, place
from efficient_nlp.quant.spec import resolve
from efficient_nlp.recipes.common import default_dir, load_data as _load_data, resolve_teacher
from efficient_nlp.recipes.outputs import deployed_quantized, latency_ms, report_to_file, save_outputs

METHODS = ("rem", "mrem_s", "mrem_p")


def methods_of(config) -> list[str]:
    names = [m.strip() for m in str(config.ptq.method).split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise ValueError(f"config.ptq.method={config.ptq.method!r}: use one or more of {METHODS} "
                         "(comma-separated)")
    return names


def check_config(config):
    """Config-time validation (before any fine-tuning): methods, the spec against the model's
    sites (a rule matching nothing raises `RuleError`), the partition, MREM-P's placement
    against the local devices, the calibration size, the QAT results file."""
    names = methods_of(config)
    spec = quant.spec_from_config(config.quant.to_dict())
    cfg = models.config_from_pretrained(default_dir(config))
    abstract = nnx.eval_shape(lambda: models.task_model_class(cfg)(cfg, rngs=nnx.Rngs(0)))
    resolve(spec, quant.find_sites(abstract)[1])
    if "mrem_s" in names or "mrem_p" in names:
        ptq.partition(cfg.num_hidden_layers, int(config.ptq.mrem.num_modules))
    if "mrem_p" in names:
        place(int(config.ptq.mrem.num_modules), list(config.ptq.mrem_p.placement))
    qat = config.ptq.get("qat_results", "")
    if qat and not os.path.isfile(qat):
        raise ValueError(f"config.ptq.qat_results={qat!r} is not a file; give the results.json of a qat "
                         "run (e.g. runs/qat/2_2_8/results.json) or leave it empty")
    k = config.ptq.calibration_size
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"config.ptq.calibration_size must be a positive int, got {k!r}")
    return names, spec


def run(config, workdir):
    """Runs PTQ; returns the results dict (see module docstring)."""
    train_lib.init_distributed(config)
    names, spec = check_config(config)
    teacher_dir = resolve_teacher(config, workdir)
    task = _load_data(config, teacher_dir)
    teacher = models.from_pretrained(teacher_dir, num_labels=task.spec.num_labels)
    p = config.ptq
    calib, rows = ptq.calibration_set(task.train, int(p.calibration_size), seed=int(p.seed))
    train_size = len(task.train["input_ids"])
    task.train = None  # nothing below may read training rows outside the calibration set

    qmodel, report = quant.quantize_model(teacher, spec)
    report_to_file(workdir, "quant_report.txt", report)
    first = {k: v[: min(int(p.batch_size), len(rows))] for k, v in calib.items()}
    quant.calibrate(qmodel, first)
    bs = config.train.eval_batch_size

    def metric_fn(predictions, labels, weights):
        return data_lib.compute_metrics(task.spec, predictions, labels, weights)

    eval_fn = distill.make_fidelity_eval_fn(task.dev, bs, metric_fn, train_lib.predict(teacher, task.dev, bs))
    results = {"task": task.spec.name, "teacher_dir": teacher_dir, "bits": spec.bits, "methods": names,
               "calibration": {"size": int(len(rows)), "train_size": int(train_size), "seed": int(p.seed)},
               "full_precision": eval_fn(teacher), "quantized_init": eval_fn(qmodel),
               "layer_errors": {"quantized_init": ptq.layer_errors(qmodel, teacher, task.dev, bs)},
               "after": {}, "wall_seconds": {}, "peak_memory": {}, "reports": {},
               "latency_ms": {"full_precision": latency_ms(teacher, config.data.max_length),
                              "note": f"median ms of one forward, batch 1 x {config.data.max_length} tokens, "
                                      "this machine"}}
    if p.get("qat_results", ""):
        with open(p.qat_results) as f:
            qat = json.load(f)
        results["qat"] = {"results": p.qat_results, "bits": qat.get("bits"), "metrics": qat["student"]}
    sample = {k: v[:1] for k, v in task.dev.items()}
    results["cost"] = {"full_precision": quant.cost_report(teacher, None, sample).summary(),
                       "quantized": quant.cost_report(teacher, spec, sample).summary()}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "calibration_indices.json"), "w") as f:
        json.dump([int(i) for i in rows], f)

    for name in names:
        t0 = time.perf_counter()
        with PeakMemory() as memory:
            if name == "rem":
                result = ptq.rem(qmodel, teacher, calib, steps=int(p.rem.steps),
                                 learning_rate=float(p.rem.learning_rate), token_batch_size=int(p.rem.token_batch_size),
                                 max_tokens=int(p.rem.max_tokens), eval_batch_size=bs, seed=int(p.seed))
            else:
                kw = dict(num_modules=int(p.mrem.num_modules), steps=int(p.mrem.steps),
                          learning_rate=float(p.mrem.learning_rate), batch_size=int(p.batch_size),
                          eval_batch_size=bs, seed=int(p.seed))
                if name == "mrem_s":
                    result = mrem.mrem_s(qmodel, teacher, calib, **kw)
                else:
                    result = mrem_p(qmodel, teacher, calib, queue_size=int(p.mrem_p.queue_size),
                                    teacher_forcing=float(p.mrem_p.teacher_forcing),
                                    placement=list(p.mrem_p.placement), **kw)
        out = result.model
        # MREM-P's report keeps its placement and phase timings next to the module rows.
        rep = {"modules": result.report, **result.info} if name == "mrem_p" else result.report
        results["wall_seconds"][name] = time.perf_counter() - t0
        results["peak_memory"][name] = memory.summary()
        results["reports"][name] = rep
        results["after"][name] = eval_fn(out)
        results["layer_errors"][name] = ptq.layer_errors(out, teacher, task.dev, bs)
        deployed, how = deployed_quantized(out)
        results["latency_ms"][name] = latency_ms(deployed, config.data.max_length)
        results["latency_ms"]["note"] = results["latency_ms"]["note"].split("; ")[0] + f"; quantized run as {how}"
        if train_lib.is_main_process():
            out_dir = os.path.join(workdir, name, "quantized")
            quant.save_packed(quant.export_packed(out), out_dir)
            results["cost"].setdefault("packed_mb", {})[name] = quant.packed_size_mb(out_dir)

    if train_lib.is_main_process():
        with open(os.path.join(workdir, "layer_errors.json"), "w") as f:
            json.dump(results["layer_errors"], f, indent=2)
        plot_layer_errors(results["layer_errors"], os.path.join(workdir, "layer_errors.png"),
                          f"{task.spec.name}, W-E-A {spec.bits}")
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    return results


def plot_layer_errors(errors: dict, path: str, title: str = ""):
    """One line per entry of ``{label: [mse per layer]}`` (log scale) into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"quantized_init": "quantized, no reconstruction", "rem": "REM", "mrem_s": "MREM-S", "mrem_p": "MREM-P"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in errors.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=labels.get(key, key))
    ax.set_xlabel("Transformer layer")
    ax.set_ylabel("FFN output MSE vs full precision (dev)")
    ax.set_yscale("log")
    ax.set_title(f"Per-layer reconstruction error{': ' + title if title else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_results(results):
    """Full precision, QAT (when given), quantized and per-method dev metrics with wall time and
    peak resident memory."""
    keys = list(results["full_precision"])
    lines = [f"Task {results['task']}: PTQ W-E-A {results['bits']}, calibration "
             f"{results['calibration']['size']} of {results['calibration']['train_size']} training rows",
             f"{'model':<26}" + "".join(f"{k:>15}" for k in keys)
             + f"{'size MB':>9}{'BOPs G':>9}{'ms':>7}{'seconds':>9}{'peak MB':>9}"]
    cost, lat = results["cost"], results.get("latency_ms", {})
    fp = (cost["full_precision"]["size_mb"], cost["full_precision"]["bops"], lat.get("full_precision"))
    rows = [("full precision", results["full_precision"], fp, None)]
    if "qat" in results:
        rows.append((f"QAT {results['qat']['bits']} (qat recipe)", results["qat"]["metrics"], None, None))
    rows.append(("quantized, no reconstr.", results["quantized_init"], None, None))
    rows += [(name, r, (cost.get("packed_mb", {}).get(name), cost["quantized"]["bops"], lat.get(name)),
              (results["wall_seconds"][name], results["peak_memory"][name]["rss_peak_mb"]))
             for name, r in results["after"].items()]

    def num(value, width, digits):
        return f"{value:>{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"

    for name, r, measured, run in rows:
        size, bops, ms = measured or (None, None, None)
        lines.append(f"{name:<26}" + "".join(f"{r.get(k, np.nan):>15.4f}" for k in keys)
                     + num(size, 9, 2) + num(None if bops is None else bops / 1e9, 9, 3) + num(ms, 7, 1)
                     + (f"{run[0]:>9.1f}{run[1]:>9.0f}" if run else ""))
    if lat:
        lines.append(f"size: packed files (full precision: float32); ms: {lat['note']}")
    return "\n".join(lines)


def _rss_bytes() -> int:
    """This process's resident set size (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Context manager: the peak resident set size of this process while the block runs
    (sampled every ``interval`` seconds in a thread) and, where ``jax`` reports it
    (``Device.memory_stats``: GPU / TPU, not CPU), the summed ``peak_bytes_in_use`` of the
    local devices (a process-lifetime high-water mark, not per block)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    def summary(self) -> dict:
        import jax
        stats = [d.memory_stats() for d in jax.local_devices()]
        device = sum(s.get("peak_bytes_in_use", 0) for s in stats if s) if any(stats) else None
        return {"rss_start_mb": self.start / 2**20, "rss_peak_mb": self.peak / 2**20,
                "device_peak_mb": None if device is None else device / 2**20,
                "how": "process RSS sampled every %g s while the method ran; device_peak_mb: jax memory_stats "
                       "peak_bytes_in_use summed over local devices (lifetime), None where unavailable (CPU)"
                       % self.interval}
