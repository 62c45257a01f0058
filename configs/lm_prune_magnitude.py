"""Unstructured magnitude pruning of the pre-trained decoder to 50% (gradual, while training on
the causal-LM loss); ``--config.prune.rules.0.pattern=n_m`` prunes 2:4 instead.

    python train.py --config configs/lm_prune_magnitude.py --workdir runs/lm_prune_magnitude

The model is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
"""
from configs import prune_magnitude
from configs._builders import lm_data_config


def get_config():
    config = prune_magnitude.get_config("0.5")
    config.data = lm_data_config()
    config.prune.rules[0]["regex"] = r"layers\.\d+\.(attention\.(query|key|value|output)|ffn\.(intermediate|gate|output))\.kernel$"
    config.train.update(num_steps=300, batch_size=16, eval_batch_size=16, learning_rate=3e-4, eval_every=100,
                        checkpoint_every=100)
    return config
