"""Low-rank factorisation of the pre-trained decoder on the built-in corpus: every attention and
FFN Linear as its truncated SVD at half and at a quarter of the hidden width, each recovered by
distillation (per-layer hidden states, then per-token logits KL) from the dense decoder
(docs/lowrank.md).

    python train.py --config configs/lm_lowrank.py --workdir runs/lm_lowrank

The teacher is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py);
ranks above a Linear's break-even keep it dense.  Results: held-out perplexity before / after.
"""
from configs import lowrank as base
from configs._builders import DECODER_LAYERS, as_lm, layerwise_matches, two_stages


def lm_recovery_stages(layers=DECODER_LAYERS, steps=(100, 100), learning_rates=(2e-4, 1e-4)):
    """Hidden states of every layer, then the per-token logits (KL)."""
    return two_stages(layerwise_matches(layers, [("hidden", "hidden_mse")]), steps=steps,
                      learning_rates=learning_rates, prediction=[dict(feature="logits", loss="kl")])


def get_config():
    config = as_lm(base.get_config())
    config.lowrank.settings = "r64,r32"
    config.distill.stages = lm_recovery_stages()
    return config
