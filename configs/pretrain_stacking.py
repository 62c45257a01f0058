"""Progressive stacking (Gong et al. 2019): pre-train configs/pretrain_mlm.py's 4-layer BERT by
training a 2-layer model first, copying its layers on top of themselves, and training on.

    python train.py --config configs/pretrain_stacking.py --workdir runs/stacked

The 2-layer model trains for ``stacking.first_steps`` steps (its steps cost about half), then the
4-layer model for the rest; the Adam moments are copied with the layers and the learning-rate
schedule runs on (``stacking.optimizer="reset"`` starts both afresh).  Compare the held-out loss
against training FLOPs and seconds with a from-scratch run (docs/pretraining.md).
"""
from configs import pretrain_mlm


def get_config():
    config = pretrain_mlm.get_config()
    config.stacking.enabled = True
    config.stacking.first_steps = 300
    return config
