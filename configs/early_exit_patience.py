"""Early exit by patience (PABEE, Zhou et al. 2020): exits after every layer trained jointly with the
backbone (loss weights growing with depth), exit when that many exits in a row agree
(docs/dynamic.md).

    python train.py --config configs/early_exit_patience.py --workdir runs/early_exit_patience
"""
from configs import early_exit


def get_config():
    config = early_exit.get_config()
    config.early_exit.rules = "patience"
    config.early_exit.training = "joint"
    config.train.learning_rate = 5e-5
    return config
