"""Structured pruning to a FLOPs target: attention heads and FFN neurons (Taylor saliency
``sum |w * grad|`` over ``score_batches`` batches, normalised per layer and unit type) are removed
lowest first until the physically shrunk model needs at most ``target`` x the dense FLOPs per
example; the masks stay fixed while fine-tuning, then the units are removed for real:

    python train.py --config configs/prune_structured_flops.py:0.5 --workdir runs/prune_flops50

The config argument is the FLOPs fraction to keep (default 0.5).
"""
import ml_collections

from configs import prune_magnitude


def get_config(target="0.5"):
    config = prune_magnitude.get_config()
    config.prune.method = "flops"
    config.prune.criterion = "saliency"
    config.prune.rules = []
    config.prune.flops = ml_collections.ConfigDict(dict(target=float(target), criterion="saliency",
                                                        score_batches=8))
    config.prune.shrink = True
    return config
