"""BERT-of-Theseus: replace blocks of two frozen teacher layers by one student layer each.

    python train.py --config configs/distill_theseus.py --workdir runs/theseus

The replacement rate grows linearly from 0.5 to 1 over the first 300 of 400 steps; there is
no distillation loss (task loss only); the student then runs alone.
"""
from configs import distill_two_stage as base


def get_config():
    config = base.get_config()
    config.distill.method = "theseus"
    config.distill.replace_rate = dict(kind="linear", start=0.5, end=1.0, steps=300)
    config.distill.stages = []
    config.train.num_steps = 400
    config.train.learning_rate = 1e-4
    return config
