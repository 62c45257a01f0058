"""QAT of the pre-trained decoder at W-E-A 4-4-8 with distillation (per-token logits KL and
hidden-state MSE to the full-precision decoder), on the built-in corpus.

    python train.py --config configs/lm_qat_4_4_8.py --workdir runs/lm_qat_4_4_8

The teacher is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py).
Results: held-out perplexity and token accuracy before / after, size and BOPs, packed artefact.
"""
from configs import qat_2_2_8 as base
from configs._builders import DECODER_LAYERS, as_lm, layerwise_matches, two_stages


def get_config():
    config = as_lm(base.get_config(4, 4, 8))
    config.distill.stages = two_stages(layerwise_matches(DECODER_LAYERS, [("hidden", "hidden_mse")]),
                                       steps=(100, 100), learning_rates=(1e-4, 5e-5),
                                       prediction=[dict(feature="logits", loss="kl")])
    return config
