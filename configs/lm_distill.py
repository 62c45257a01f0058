"""Distil the pre-trained decoder into a student with half of its layers (layers 0 and 2 copied),
matching per-token logits (KL) and hidden states, then the logits alone.

    python train.py --config configs/lm_distill.py --workdir runs/lm_distill

The teacher is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
"""
from configs import distill_two_stage as base
from configs._builders import as_lm, two_stages
from efficient_nlp.distill import layer_matches


def get_config():
    config = as_lm(base.get_config())
    config.student.layers = (0, 2)
    config.student.overrides = dict(hidden_dropout_prob=0.0)
    config.distill.stages = two_stages(layer_matches("hidden", "hidden_mse", [(0, 0), (1, 2), (2, 4)]),
                                       steps=(150, 150), learning_rates=(2e-4, 1e-4),
                                       prediction=[dict(feature="logits", loss="kl")])
    return config
