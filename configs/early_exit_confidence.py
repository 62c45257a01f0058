"""Early exit with the calibrated-confidence rule (RightTool, Schwartz et al. 2020): an exit after
every layer, each exit's temperature fitted on the dev set, exit when the calibrated max probability
exceeds the threshold (docs/dynamic.md).

    python train.py --config configs/early_exit_confidence.py --workdir runs/early_exit_confidence
"""
from configs import early_exit


def get_config():
    config = early_exit.get_config()
    config.early_exit.rules = "confidence"
    return config
