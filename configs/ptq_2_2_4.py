"""PTQ at W-E-A 2-2-4: TWN weights and word embeddings, 4-bit LSQ activations (LSQ+ offset for
the asymmetric ones); see configs/ptq_2_2_8.py (step counts sized for 2 CPU cores).

    python train.py --config configs/ptq_2_2_4.py --workdir runs/ptq_2_2_4
"""
from configs import ptq_2_2_8 as base


def get_config():
    return base.get_config(2, 2, 4)
