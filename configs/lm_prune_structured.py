"""Structured pruning of the pre-trained decoder: half of the key/value head groups (each with
its query heads) and half of the FFN neurons (up, gate and down together) of every layer, by
Taylor saliency while training on the causal-LM loss, then physical removal.

    python train.py --config configs/lm_prune_structured.py --workdir runs/lm_prune_structured

The model is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
"""
from configs import prune_structured
from configs._builders import lm_data_config


def get_config(fraction="0.5"):
    config = prune_structured.get_config(fraction)
    config.data = lm_data_config()
    config.prune.rules[1]["regex"] = r"ffn\.((intermediate|gate)\.(kernel|bias)|output\.kernel)$"
    config.train.update(num_steps=300, batch_size=16, eval_batch_size=16, learning_rate=3e-4, eval_every=100,
                        checkpoint_every=100)
    return config
