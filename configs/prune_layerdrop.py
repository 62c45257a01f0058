"""LayerDrop (Fan et al. 2020) on the built-in task: fine-tune with each layer skipped with
probability ``rate``, then remove layers on demand (``keep``: "every_other" or a list of layer
indices) and evaluate the smaller model without retraining:

    python train.py --config configs/prune_layerdrop.py:0.2 --workdir runs/prune_layerdrop
"""
import ml_collections

from configs import prune_magnitude


def get_config(rate="0.2"):
    config = prune_magnitude.get_config()
    config.prune.method = "layerdrop"
    config.prune.criterion = "none"
    config.prune.rules = []
    config.prune.layerdrop = ml_collections.ConfigDict(dict(rate=float(rate), keep="every_other"))
    config.prune.shrink = True
    return config
