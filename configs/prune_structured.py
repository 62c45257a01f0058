"""Structured pruning: 50% of the attention heads and 50% of the FFN neurons of every layer
(Taylor saliency, gradual), then physical removal: the smaller model is saved to
``workdir/model_shrunk`` with its parameters / FLOPs / CPU latency report.

    python train.py --config configs/prune_structured.py --workdir runs/prune_heads_ffn

The config argument is the fraction of heads and neurons removed (default 0.5).
"""
from configs import prune_magnitude


def get_config(fraction="0.5"):
    config = prune_magnitude.get_config()
    config.prune.criterion = "saliency"
    config.prune.rules = [
        dict(regex=r"attention\.(query|key|value)\.(kernel|bias)$|attention\.output\.kernel$",
             pattern="heads", sparsity=float(fraction), distribution="uniform"),
        dict(regex=r"ffn\.(intermediate\.(kernel|bias)|output\.kernel)$",
             pattern="ffn_neurons", sparsity=float(fraction), distribution="uniform"),
    ]
    config.prune.shrink = True
    return config
