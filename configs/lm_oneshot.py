"""One-shot post-training compression of the pre-trained decoder (configs/pretrain_causal_lm.py)
on blocks of the built-in corpus: the rows of configs/oneshot.py, scored by perplexity.

    python train.py --config configs/lm_oneshot.py --workdir runs/lm_oneshot

Groups of 64 instead of 128: the decoder's FFN width (704) is not a multiple of 128.
"""
from configs import oneshot
from configs._builders import DECODER_LAYERS, as_lm


def get_config():
    config = as_lm(oneshot.get_config(settings="w4g64,w3,w2,w8a8,w4a8"))
    config.oneshot.batch_size = 16
    config.oneshot.mrem.num_modules = DECODER_LAYERS // 2
    return config
