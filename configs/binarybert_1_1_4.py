"""BinaryBERT at W-E-A 1-1-4: LSQ 4-bit activations (learned step sizes, LSQ+ offsets for the
asymmetric ones), otherwise configs/binarybert_1_1_8.py.

    python train.py --config configs/binarybert_1_1_4.py --workdir runs/binarybert_1_1_4
"""
from configs import binarybert_1_1_8 as base


def get_config():
    return base.get_config(4, activation_method="lsq")
