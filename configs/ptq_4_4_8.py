"""PTQ at W-E-A 4-4-8: 4-bit uniform weights and word embeddings, 8-bit LSQ activations
(see configs/ptq_2_2_8.py for the recipe, the step counts sized for 2 CPU cores and overrides).

    python train.py --config configs/ptq_4_4_8.py --workdir runs/ptq_4_4_8
"""
from configs import ptq_2_2_8 as base


def get_config():
    return base.get_config(4, 4, 8)
