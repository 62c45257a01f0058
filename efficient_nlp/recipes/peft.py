"""Parameter-efficient fine-tuning side by side: LoRA, Houlsby adapters and QLoRA against full
fine-tuning of the same pretrained model, on a classification task or causal language modelling
(docs/peft.md).

    python train.py --config configs/peft.py --workdir runs/peft
    python train.py --config configs/lm_peft.py --workdir runs/lm_peft

For each method of ``config.peft.methods`` (``full``, ``lora``, ``adapters``, ``qlora``) the
pretrained model (``config.model_dir``; "" = the default model of the task kind) is adapted and
fine-tuned for ``config.train.num_steps`` at that method's learning rate
(``config.peft.learning_rates``) in ``workdir/<method>``:

* ``full``: every parameter trains (the reference);
* ``lora``: ``W x + (alpha / r) B A x`` on the sites of ``config.peft.roles`` (A random, B = 0, so
  training starts from the pretrained function); only A, B and the task head train (a causal
  LM's head stays as pretrained);
* ``adapters``: a bottleneck (down, GELU, up; up = 0 at the start) after the attention output and
  the FFN output projections; only the adapters and the head train;
* ``qlora``: the layer stack's Linears stored in 4 bits (``config.peft.grid``: NF4 or uniform
  int4, per-block absmax scales, the scales themselves quantized: QLoRA's double quantization),
  frozen, and LoRA on top.

Each row reports the dev metrics before and after, the trainable parameters, the planned memory
of one training step (`efficient_nlp.train.step_memory`: peak, optimizer state, frozen state),
the stored size of what the method adds, and the training time.  Saved: LoRA / QLoRA adapters as
PEFT directories ``workdir/<method>/adapter`` (``adapter_config.json`` +
``adapter_model.safetensors``), Houlsby adapters as ``workdir/adapters/adapter.safetensors``,
and with ``config.peft.save_merged`` the LoRA model merged into its base as a HF directory
``workdir/lora/merged``.  The full fine-tuning baseline is measured, not saved.
"""
from __future__ import annotations

import os
import time

import numpy as np
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import models, peft
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.common import default_dir, final_eval, is_lm, load_data, stage_config
from efficient_nlp.recipes.finetune import task_loss
from efficient_nlp.recipes.lowrank import check_roles
from efficient_nlp.recipes.outputs import save_outputs

METHODS = ("full", "lora", "adapters", "qlora")


def parse_methods(text) -> list[str]:
    """``"full,lora"`` -> ``["full", "lora"]``; unknown names raise naming the valid ones."""
    methods = [m.strip() for m in str(text).split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"config.peft.methods={text!r}: unknown {bad or 'empty'}; choose from {METHODS}")
    return methods


def _roles(text) -> tuple[str, ...]:
    return tuple(r.strip() for r in str(text).split(",") if r.strip())


def check_config(config) -> list[str]:
    """Config-time validation (before any model is loaded or trained)."""
    p = config.peft
    methods = parse_methods(p.methods)
    missing = [m for m in methods if m not in p.learning_rates]
    if missing:
        raise ValueError(f"config.peft.learning_rates has no entry for {missing}; add e.g. "
                         f"--config.peft.learning_rates.{missing[0]}=1e-3")
    check_roles(_roles(p.roles), "config.peft.roles")
    check_roles(_roles(p.adapter_roles), "config.peft.adapter_roles")
    if "qlora" in methods and p.grid not in peft.qlora.BLOCK_GRIDS:
        raise ValueError(f"config.peft.grid={p.grid!r}; QLoRA's base grid is one of {peft.qlora.BLOCK_GRIDS}")
    if int(p.rank) < 1 or int(p.adapter_size) < 1:
        raise ValueError(f"config.peft.rank={p.rank} and config.peft.adapter_size={p.adapter_size} must be >= 1")
    return methods


def adapt(model, method: str, p, *, head: bool = True):
    """``(model, trainable filter, description)``: ``model`` prepared for ``method`` (a copy);
    ``head``: the head's parameters train too (a fresh classifier; not a causal LM's head)."""
    if method == "full":
        return train_lib.copy_model(model), nnx.Param, "every parameter"
    what = []
    if method == "qlora":
        model, report = peft.qlora.quantize_base(model, grid=p.grid, block_size=int(p.block_size),
                                                 double_quant=bool(p.double_quant))
        what.append(str(report).splitlines()[0])
    if method in ("lora", "qlora"):
        model, report = peft.add_lora(model, roles=_roles(p.roles), rank=int(p.rank), alpha=float(p.alpha),
                                      dropout=float(p.dropout), seed=int(p.seed))
    else:
        model, report = peft.add_adapters(model, size=int(p.adapter_size), roles=_roles(p.adapter_roles),
                                          seed=int(p.seed))
    what.append(str(report).splitlines()[0])
    return model, peft.trainable(model, head=head), "; ".join(what)


def _save(model, method, out, config, model_dir) -> int:
    """Writes what ``method`` adds under ``out``; returns its bytes on disk (0 for ``full``)."""
    if method == "full" or not train_lib.is_main_process():
        return 0
    if method == "adapters":
        path = os.path.join(out, "adapter.safetensors")
        peft.save_adapter(model, path)
        return os.path.getsize(path)
    adapter_dir = os.path.join(out, "adapter")
    peft.save_peft_dir(model, adapter_dir, base_model_name_or_path=model_dir)
    if method == "lora" and config.peft.save_merged:
        models.save_hf_checkpoint(peft.merge(model), os.path.join(out, "merged"))
    return sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir))


def run(config, workdir):
    """Runs every method of ``config.peft.methods``; returns the results dict (module docstring)."""
    train_lib.init_distributed(config)
    methods = check_config(config)
    model_dir = config.model_dir or default_dir(config)
    task = load_data(config, model_dir)
    spec = task.spec
    base = models.from_pretrained(model_dir, num_labels=spec.num_labels, seed=config.train.seed)
    eval_fn = train_lib.make_eval_fn(
        task.dev, config.train.eval_batch_size,
        lambda predictions, labels, weights: data_lib.compute_metrics(spec, predictions, labels, weights))

    def batches(start_step):
        return data_lib.train_batches(task.train, config.train.batch_size, seed=config.train.seed,
                                      start_step=start_step)

    sample = next(batches(0))
    results = {"task": spec.name, "model_dir": model_dir, "steps": int(config.train.num_steps),
               "base_params": int(sum(np.size(v.get_value()) for v in models.named_params(base).values())),
               "methods": {}}
    for method in methods:
        print(f"[{method}] preparing ...", flush=True)
        model, trainable, what = adapt(base, method, config.peft, head=not is_lm(config))
        cfg = stage_config(config, config.train.num_steps, config.peft.learning_rates[method])
        memory = train_lib.step_memory(model, task_loss, train_lib.make_optimizer(cfg, cfg.train.num_steps),
                                       sample, trainable)
        before = eval_fn(model)
        start = time.perf_counter()
        model, history = train_lib.fit(model, task_loss, batches, config=cfg,
                                       workdir=os.path.join(workdir, method), eval_fn=eval_fn, trainable=trainable)
        seconds = time.perf_counter() - start
        row = {"what": what, "learning_rate": float(config.peft.learning_rates[method]),
               "dev_before": before, "dev_after": final_eval(history), "train_seconds": seconds,
               "memory": memory, "trainable_params": memory["trainable_params"],
               "trainable_fraction": memory["trainable_params"] / results["base_params"]}
        row["stored_bytes"] = _save(model, method, os.path.join(workdir, method), config, model_dir)
        results["methods"][method] = row
    print(format_results(results))
    save_outputs(workdir, results, task.tokenizer, {})
    print(f"Results: {os.path.join(workdir, 'results.json')}")
    return results


def _width(metric: str) -> int:
    return len(metric) + 9


def format_results(results) -> str:
    """One row per method: dev metrics before / after, trainable parameters, step memory, size."""
    rows = results["methods"]
    keys = list(next(iter(rows.values()))["dev_after"])
    lines = [f"Task {results['task']}: parameter-efficient fine-tuning of {results['model_dir']} "
             f"({results['base_params']:,} parameters), {results['steps']} steps",
             f"{'method':<10}" + "".join(f"{k + ' before':>{_width(k)}}{k + ' after':>{_width(k)}}" for k in keys)
             + f"{'trainable':>12}{'share':>8}{'peak MB':>9}{'optim MB':>9}{'saved MB':>9}{'train s':>9}"]
    for method, r in rows.items():
        m = r["memory"]
        lines.append(f"{method:<10}" + "".join(f"{r['dev_before'][k]:>{_width(k)}.4f}{r['dev_after'][k]:>{_width(k)}.4f}"
                                               for k in keys)
                     + f"{r['trainable_params']:>12,}{r['trainable_fraction']:>8.2%}{m['peak_bytes'] / 2**20:>9.1f}"
                     + f"{m['optimizer_bytes'] / 2**20:>9.1f}{r['stored_bytes'] / 2**20:>9.2f}{r['train_seconds']:>9.0f}")
    return "\n".join(lines)


__all__ = ["METHODS", "adapt", "check_config", "format_results", "parse_methods", "run"]
