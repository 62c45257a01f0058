"""Lottery-ticket search (Frankle & Carbin 2019; rewinding: Frankle et al. 2020) on the built-in
task: train, prune the smallest-magnitude fraction of the surviving encoder weights, rewind the
survivors to their values after ``rewind_step`` updates, retrain; ``rounds`` times.  The config
argument is the final sparsity (default 0.9 after 3 rounds, i.e. ~54% of the survivors removed per
round):

    python train.py --config configs/prune_lottery.py:0.9 --workdir runs/prune_lottery90

Each round trains ``num_steps`` (round 0) or ``num_steps - rewind_step`` updates; per-round dev
metrics and sparsities are in ``results.json`` (``rounds``).
"""
import ml_collections

from configs import prune_magnitude


def get_config(sparsity="0.9"):
    config = prune_magnitude.get_config(sparsity)
    config.train.num_steps = 200
    config.train.eval_every = 0
    config.prune.method = "lottery"
    config.prune.criterion = "magnitude"
    config.prune.rules[0]["distribution"] = "uniform"  # every tensor keeps the same fraction
    config.prune.lottery = ml_collections.ConfigDict(dict(rounds=3, rewind_step=20))
    config.prune.shrink = False
    return config
