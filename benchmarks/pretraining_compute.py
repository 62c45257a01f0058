"""Pre-training at equal compute on the built-in corpus: masked LM vs ELECTRA (judged by fine-tuning
on the built-in task) and progressive stacking vs training the full depth from scratch.

    python benchmarks/pretraining_compute.py [--steps 600] [--out runs/pretraining] [--docs docs]

One run after another, in this process, with configs/pretrain_mlm.py's 4-layer BERT (width 128,
WordPiece 4096, blocks of 128, batch 32):

1. ``mlm``: masked LM for ``--steps`` steps; its training FLOPs are the budget B.
2. ``electra``: ELECTRA (generator 1/4 width, discriminator = the same BERT) for as many steps as
   fit in B (the family FLOPs model, training = 3 x forward).
3. ``stacked``: progressive stacking: the 2-layer model for ``--first`` steps (default half of
   ``--steps``), stacked to 4 layers, then as many 4-layer steps as fit in what is left of B.
4. Fine-tunes each, and the same BERT with random weights (no pre-training), on the built-in task
   with the same settings (configs/quickstart.py, learning rate 3e-4, ``--finetune_steps``), and
   prints the dev accuracy of each (mean over ``--seeds`` fine-tuning seeds) next to its
   pre-training compute.  ``--finetune_only`` redoes only this step from ``<out>/summary.json``.

Writes ``<out>/summary.json``, ``<docs>/pretraining_stacking.png`` (held-out masked-LM loss against
training FLOPs and against training seconds, mlm vs stacked) and prints a markdown table.  Every
run also carries the compute accounting of the library (results.json "compute").  Wall times share
the machine with whatever else runs: the printed load average says how busy it was.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def _pretrain_config(objective, steps, first=0):
    from configs import pretrain_mlm
    config = pretrain_mlm.get_config()
    config.objective = objective
    config.train.num_steps = int(steps)
    config.train.eval_every = max(1, int(steps) // 6)
    if first:
        config.stacking.enabled, config.stacking.first_steps = True, int(first)
    return config


def _flops_per_step(config, num_layers=None):
    """Training FLOPs of one step of the model ``config`` builds (built abstractly, no weights)."""
    from flax import nnx

    from efficient_nlp.data import corpus
    from efficient_nlp.pretrain import data as pdata
    from efficient_nlp.recipes import pretrain
    tok = pdata.train_wordpiece_tokenizer(corpus.builtin_corpus("train"), config.tokenizer.vocab_size,
                                          min_frequency=config.tokenizer.min_frequency)
    model = nnx.eval_shape(lambda: pretrain._build(config, tok, num_layers))
    return pretrain.step_flops(model, int(config.train.batch_size), int(config.data.block_size))


def _finetune(model_dir, workdir, steps, seed):
    """configs/quickstart.py's fine-tuning on the built-in task (learning rate 3e-4: small models)."""
    from configs import quickstart
    from efficient_nlp.recipes import run_recipe
    config = quickstart.get_config()
    config.model_dir = model_dir
    config.train.update(num_steps=int(steps), learning_rate=3e-4, eval_every=int(steps),
                        checkpoint_every=int(steps), seed=int(seed))
    return run_recipe(config, workdir)


def _untrained(config, tokenizer_dir, out):
    """The same BERT with random weights and the mlm run's tokenizer: the no-pre-training baseline."""
    from flax import nnx

    from efficient_nlp import models
    from efficient_nlp.data.pipeline import load_tokenizer
    from efficient_nlp.recipes import pretrain
    tok = load_tokenizer(tokenizer_dir)
    model = models.BertForMaskedLM(pretrain.encoder_config(config, tok), rngs=nnx.Rngs(int(config.train.seed)))
    models.save_hf_checkpoint(model, out)
    tok.save_pretrained(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--first", type=int, default=0, help="2-layer steps of the stacked run (default steps / 2)")
    p.add_argument("--finetune_steps", type=int, default=300)
    p.add_argument("--out", default="runs/pretraining")
    p.add_argument("--docs", default="docs")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per model (seeds 0, 1, ...)")
    p.add_argument("--finetune_only", action="store_true",
                   help="reuse <out>/summary.json and the pre-trained models; redo the fine-tuning only")
    args = p.parse_args()

    from efficient_nlp.pretrain.plots import LossCurve, plot_loss_vs_compute
    from efficient_nlp.recipes import run_recipe

    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} at start")
    summary_path = os.path.join(args.out, "summary.json")
    if args.finetune_only:
        with open(summary_path) as f:
            summary = json.load(f)
    else:
        steps, first = args.steps, args.first or args.steps // 2
        mlm_cfg = _pretrain_config("mlm", steps)
        full = _flops_per_step(mlm_cfg)
        budget = full * steps
        electra_steps = int(budget // _flops_per_step(_pretrain_config("electra", steps)))
        half = _flops_per_step(mlm_cfg, num_layers=mlm_cfg.model.num_hidden_layers // 2)
        stacked_total = first + int((budget - first * half) // full)
        plan = {"mlm": _pretrain_config("mlm", steps),
                "electra": _pretrain_config("electra", electra_steps),
                "stacked": _pretrain_config("mlm", stacked_total, first=first)}
        print(f"budget {budget:.3g} training FLOPs: mlm {steps} steps, electra {electra_steps} steps, "
              f"stacked {first} x 2 layers + {stacked_total - first} x 4 layers")
        summary = {}
        for name, config in plan.items():
            res = run_recipe(config, os.path.join(args.out, name))
            summary[name] = {"steps": res["training"]["steps"], "flops": res["training"]["flops"],
                             "train_seconds": res["training"]["train_seconds"],
                             "held_out": res["held_out"], "curve": res["curve"],
                             "stages": res["training"]["stages"],
                             "compute": res.get("compute"), "load_average": os.getloadavg()[0]}
        _untrained(mlm_cfg, os.path.join(args.out, "mlm", "tokenizer"), os.path.join(args.out, "random", "model"))
        summary["no pre-training"] = {"steps": 0, "flops": 0.0, "train_seconds": 0.0, "curve": [],
                                      "held_out": {"metric": "-"}}
    for name, entry in summary.items():
        model_dir = os.path.join(args.out, "random" if name == "no pre-training" else name, "model")
        entry["dev_accuracy"] = [
            _finetune(model_dir, os.path.join(args.out, f"{name.replace(' ', '_')}_finetune_seed{seed}"),
                      args.finetune_steps, seed)["dev_after"].get("accuracy") for seed in range(args.seeds)]
    os.makedirs(args.out, exist_ok=True)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    png = os.path.join(args.docs, "pretraining_stacking.png")

    def _points(name):
        return [(p["flops"], p["seconds"], p["loss"]) for p in summary[name]["curve"]]

    s1 = summary["stacked"]["stages"][0]
    grew = [(s1["flops_per_step"] * s1["steps"], s1["seconds"], "2 -> 4 layers")]
    plot_loss_vs_compute({"4 layers from scratch": LossCurve.from_points(_points("mlm")),
                          "progressive stacking": LossCurve.from_points(_points("stacked"), events=grew)},
                         png, title="Masked-LM pre-training at equal compute (built-in corpus, 2-core CPU)",
                         loss_name="held-out masked-LM loss")
    print(f"| run | steps | training FLOPs | train min | held-out loss (last) | dev accuracy, mean of {args.seeds} "
          "fine-tuning seeds (min-max) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        print(f"| {name} | {s['steps']} | {s['flops']:.3g} | {s['train_seconds'] / 60:.1f} | "
              + (f"{s['held_out']['metric']} {s['curve'][-1]['loss']:.3f}" if s["curve"] else "-")
              + f" | {np.mean(s['dev_accuracy']):.4f} ({min(s['dev_accuracy']):.4f}-{max(s['dev_accuracy']):.4f}) |")
    print(f"plot: {png}; summary: {summary_path}; "
          f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
