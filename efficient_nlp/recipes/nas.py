"""NAS recipe (docs/nas.md): width search with affine parameter sharing, then retraining.

    python train.py --config configs/aps_cnn_transitional.py --workdir runs/aps_t

1. builds the search space (``config.space``: digits ResNet or a pretrained encoder's widths);
2. runs the two-stage search (``config.search``; `efficient_nlp.nas.Searcher`) in
   ``workdir/search`` (checkpointed, resumable);
3. beam search for the top-N architectures, picks the one closest to the FLOPs budget;
4. retrains it (``config.retrain``, the `train.fit` loop, in ``workdir/retrain``): from scratch
   for the CNN, from the inherited candidate kernels (or scratch) for an encoder;
5. writes ``results.json`` and the plots ``decisions.png``, ``sharing.png``, ``accuracy.png``
   (and, for an encoder, the smaller model as a HF directory ``workdir/model``).
"""
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from efficient_nlp import data as data_lib
from efficient_nlp import train as train_lib
from efficient_nlp.nas import plots, search, spaces
from efficient_nlp.nas.aps import unit_columns_error


def make_evaluator(space, logits_fn, arrays, batch_size, mesh=None):
    """``eval_fn(model) -> {"accuracy"}`` over every example of ``arrays`` (padding weighted 0)."""
    import jax
    from flax import nnx
    mesh = mesh or train_lib.make_mesh()

    def eval_fn(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def correct(state, batch):
            logits = logits_fn(nnx.merge(graphdef, state), batch)
            hit = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
            return jnp.sum(hit * batch["weight"])

        hits = total = 0.0
        for b in data_lib.eval_batches(arrays, batch_size):
            hits += float(correct(state, train_lib.shard_batch(b, mesh)))
            total += float(np.sum(b["weight"]))
        return {"accuracy": hits / max(total, 1.0)}

    return eval_fn


def retrain(space, arch, supernet, config, workdir):
    """Trains the child network of ``arch`` with `train.fit`; ``(model, history)``."""
    child = space.child(arch, supernet, int(config.seed))

    def loss_fn(model, batch, rngs):
        logits = space.child_logits(model, batch, True, rngs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}

    def batches(start_step):
        return data_lib.train_batches(space.data["train"], config.retrain.batch_size,
                                      seed=int(config.seed), start_step=start_step)

    eval_fn = make_evaluator(space, lambda m, b: space.child_logits(m, b, False, None),
                             space.data["test"], int(config.retrain.eval_batch_size))
    cfg = ml_collections.ConfigDict({"train": config.retrain})
    return train_lib.fit(child, loss_fn, batches, config=cfg, workdir=workdir, eval_fn=eval_fn)


def run(config, workdir):
    """Search, choose, retrain; returns the results dict (also ``workdir/results.json``)."""
    import json
    from flax import nnx

    train_lib.init_distributed(config)
    space = spaces.build_space(config)
    searcher = search.Searcher(space, config.search, seed=int(config.seed))
    search_dir = os.path.join(workdir, "search")
    searcher.run(search_dir)
    step = int(train_lib.to_host(searcher.state.step))
    results = {"space": space.name, "sharing": config.search.sharing, "seed": int(config.seed),
               "search_steps": step, "max_flops": space.flops.max(), "budget": searcher.budget}
    if step < int(config.search.num_steps):  # interrupted on purpose (search.stop_after)
        return results
    top = searcher.top_architectures()
    arch, logp, flops = search.choose(top, searcher.budget)
    records = train_lib.read_metrics(search_dir) if train_lib.is_main_process() else []
    last = records[-1] if records else {}
    results.update({
        "top": [{"arch": space.describe(a), "log_prob": lp, "flops": f} for a, lp, f in top],
        "chosen": space.describe(arch), "chosen_indices": list(arch), "chosen_flops": flops,
        "chosen_flops_ratio": flops / space.flops.max(),
        "chosen_over_budget": searcher.budget is not None and flops > searcher.budget,
        "final_probabilities": {name: [last.get(f"prob/{name}/{a}") for a in
                                       range(len(space.candidates[d]))]
                                for d, name in enumerate(space.decisions)},
        "phi_final": last.get("phi"), "unit_columns_error": unit_columns_error(
            nnx.merge(searcher.graphdef, *train_lib.to_host(
                (searcher.state.params, searcher.state.transforms, searcher.state.rest)))),
        "supernet_val_accuracy": searcher.evaluate(arch, space.data["val"]),
    })
    retrain_records = []
    if int(config.retrain.num_steps) > 0:
        supernet = nnx.merge(searcher.graphdef, searcher.state.params, searcher.state.transforms,
                             searcher.state.rest)
        model, retrain_records = retrain(space, arch, supernet, config,
                                         os.path.join(workdir, "retrain"))
        evals = [r for r in retrain_records if "eval/accuracy" in r]
        results["test_accuracy"] = evals[-1]["eval/accuracy"] if evals else None
        if "tokenizer" in space.extra and train_lib.is_main_process():   # a text model: save it
            from efficient_nlp.recipes.outputs import save_outputs
            save_outputs(workdir, {}, space.extra["tokenizer"], {"model": model})
    if train_lib.is_main_process():
        title = f"APS-{config.search.sharing[0].upper()} ({space.name})"
        plots.plot_all(workdir, records, retrain_records, space, searcher.warmup_steps, title)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    print(format_results(results))
    return results


def format_results(results):
    lines = [f"APS {results['sharing']} on {results['space']} (seed {results['seed']}): "
             f"chosen {results.get('chosen')}",
             f"FLOPs {results.get('chosen_flops', 0):.4g} = "
             f"{results.get('chosen_flops_ratio', 0):.3f} of max; budget {results['budget']}"
             + (" (OVER the budget: no top architecture fit it)" if results.get("chosen_over_budget") else "")]
    if results.get("test_accuracy") is not None:
        lines.append(f"retrained test accuracy {results['test_accuracy']:.4f}")
    return "\n".join(lines)
