"""Cross-layer parameter sharing of the pre-trained decoder on the built-in corpus: its layer
positions served by half as many unique layers (cycle-rev), averaged from the decoder's layers and
recovered by distillation (per-layer hidden states, then per-token logits KL) (docs/lowrank.md).

    python train.py --config configs/lm_sharing.py --workdir runs/lm_sharing

The teacher is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
"""
from configs import sharing as base
from configs._builders import DECODER_LAYERS, as_lm
from configs.lm_lowrank import lm_recovery_stages


def get_config():
    config = as_lm(base.get_config())
    config.sharing.num_unique = DECODER_LAYERS // 2
    config.distill.stages = lm_recovery_stages()
    return config
