"""Token skipping by PoWER-BERT (Goyal et al. 2020): a soft extraction layer learns how many tokens
each layer keeps (L1 penalty on the retention weights), the counts are fixed, then the model is
fine-tuned keeping the top tokens by attention received (docs/dynamic.md).

    python train.py --config configs/token_skip_power.py --workdir runs/token_skip_power
"""
from configs import token_skip


def get_config():
    config = token_skip.get_config()
    config.token_skip.method = "power"
    config.token_skip.skip_learning_rate = 5e-3
    config.token_skip.scales = "0.5,0.75,1,1.25,1.5"
    return config
