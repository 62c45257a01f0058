"""Movement pruning (Sanh et al. 2020) during fine-tuning: scores ``-sum_t grad * w``; the target
sparsity is the config argument (default 0.9):

    python train.py --config configs/prune_movement.py:0.9 --workdir runs/prune_mov90

Same rules, schedule and steps as ``configs/prune_magnitude.py`` so the two compare directly.
"""
from configs import prune_magnitude


def get_config(sparsity="0.9"):
    config = prune_magnitude.get_config(sparsity)
    config.prune.criterion = "movement"
    return config
