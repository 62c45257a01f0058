"""Cross-layer parameter sharing of the fine-tuned MiniLM-L6: 6 layer positions served by 3 unique
layers in the cycle-rev order of Takase & Kiyono (2021), each unique layer the average of the
teacher layers mapped to it, recovered by two-stage distillation (docs/lowrank.md).

    python train.py --config configs/sharing.py --workdir runs/sharing

Other assignments: ``--config.sharing.mode=all`` (ALBERT, then ``num_unique`` is 1), ``sequence``,
``cycle``.  With ``teacher_dir`` empty the teacher is fine-tuned first (~10 min on 2 CPU cores);
recovery adds ~8 min.
"""
import ml_collections

from configs._builders import (MINILM_LAYERS, add_teacher, layerwise_matches, new_config, student_train_config,
                               two_stages)
from efficient_nlp.train import default_distributed_config


def recovery_stages(layers=MINILM_LAYERS, steps=(200, 200), learning_rates=(1e-4, 5e-5)):
    """Hidden states and attention scores of every layer, then the logits (soft CE, T = 1)."""
    return two_stages(layerwise_matches(layers, (("hidden", "hidden_mse"), ("attn_scores", "attention_mse"))),
                      steps=steps, learning_rates=learning_rates)


def get_config():
    config = add_teacher(new_config("sharing"))
    config.sharing = ml_collections.ConfigDict(dict(
        num_unique=3,          # M unique layers for the N layer positions
        mode="cycle_rev",      # all | sequence | cycle | cycle_rev
        init="average",        # average | first (of the teacher layers mapped to a unique layer)
    ))
    config.distill = ml_collections.ConfigDict(dict(stages=recovery_stages()))
    config.train = student_train_config(weight_decay=0.01, grad_clip=1.0)
    config.distributed = default_distributed_config()
    return config
