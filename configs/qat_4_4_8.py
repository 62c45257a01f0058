"""QAT at W-E-A 4-4-8 (see configs/qat_2_2_8.py for the recipe and timings).

    python train.py --config configs/qat_4_4_8.py --workdir runs/qat_4_4_8
"""
from configs import qat_2_2_8 as base


def get_config():
    return base.get_config(4, 4, 8)
