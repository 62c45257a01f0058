"""Recipes: short functions ``run(config, workdir) -> results`` wiring the layers from a config.

``train.py`` only looks the recipe up here by ``config.recipe`` and calls it.
"""
import importlib

# recipe name -> module holding ``run(config, workdir)``; imported lazily.
RECIPES = {
    "finetune": "efficient_nlp.recipes.finetune",
    "distill": "efficient_nlp.recipes.distill",
    "prune": "efficient_nlp.recipes.prune",
    "qat": "efficient_nlp.recipes.qat",
    "ptq": "efficient_nlp.recipes.ptq",
    "oneshot": "efficient_nlp.recipes.oneshot",
    "nas": "efficient_nlp.recipes.nas",
    "cross_distill": "efficient_nlp.recipes.cross_distill",
    "binarybert": "efficient_nlp.recipes.binarybert",
    "binarybert_adaptive": "efficient_nlp.recipes.adaptive_split",
    "causal_lm": "efficient_nlp.recipes.causal_lm",
    "lowrank": "efficient_nlp.recipes.lowrank",
    "sharing": "efficient_nlp.recipes.sharing",
    "peft": "efficient_nlp.recipes.peft",
    "early_exit": "efficient_nlp.recipes.early_exit",
    "token_skip": "efficient_nlp.recipes.token_skip",
    "pretrain": "efficient_nlp.recipes.pretrain",
}


def run_recipe(config, workdir):
    """Runs ``config.recipe`` with ``config`` in ``workdir``; returns the recipe's results.

    Every recipe runs inside a compute meter (`efficient_nlp.train.compute`): afterwards, on the
    main process, its summary (training FLOPs, throughput, MFU, energy, CO2, with their sources)
    is printed and added as ``results["compute"]`` and to ``workdir/results.json`` when the
    recipe wrote one.  ``config.compute`` (optional) sets the assumptions; ``enabled=False``
    turns this off.
    """
    from efficient_nlp.train import compute

    name = config.get("recipe")
    if name not in RECIPES:
        raise ValueError(
            f"Unknown recipe {name!r} in config.recipe; known recipes: {sorted(RECIPES)}.")
    run = importlib.import_module(RECIPES[name]).run
    if not compute.compute_options(config).enabled:
        return run(config, workdir)
    with compute.Meter(config) as meter:
        results = run(config, workdir)
    return compute.report(meter, results, workdir)
