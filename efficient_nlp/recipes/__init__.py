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
}


def run_recipe(config, workdir):
    """Runs ``config.recipe`` with ``config`` in ``workdir``; returns the recipe's results."""
    name = config.get("recipe")
    if name not in RECIPES:
        raise ValueError(
            f"Unknown recipe {name!r} in config.recipe; known recipes: {sorted(RECIPES)}.")
    return importlib.import_module(RECIPES[name]).run(config, workdir)
