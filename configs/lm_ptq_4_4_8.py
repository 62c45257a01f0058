"""PTQ of the pre-trained decoder at W-E-A 4-4-8 by reconstruction (REM, MREM-S; add mrem_p with
``--config.ptq.method=rem,mrem_s,mrem_p``) on blocks of the built-in corpus.

    python train.py --config configs/lm_ptq_4_4_8.py --workdir runs/lm_ptq_4_4_8

The teacher is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
"""
from configs import ptq_2_2_8 as base
from configs._builders import DECODER_LAYERS, as_lm


def get_config():
    config = as_lm(base.get_config(4, 4, 8, method="rem,mrem_s"))
    config.ptq.calibration_size = 256
    config.ptq.batch_size = 8
    config.ptq.mrem.num_modules = DECODER_LAYERS // 2
    return config
