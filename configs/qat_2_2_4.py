"""QAT at W-E-A 2-2-4: TWN weights, 4-bit activations with learned step sizes (LSQ, LSQ+ offset
for the asymmetric ones), calibrated on one training batch (see configs/qat_2_2_8.py).

    python train.py --config configs/qat_2_2_4.py --workdir runs/qat_2_2_4
"""
from configs import qat_2_2_8 as base


def get_config():
    return base.get_config(2, 2, 4, activation_method="lsq")
