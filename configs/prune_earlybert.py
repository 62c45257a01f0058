"""EarlyBERT-style slimming (Chen et al. 2021) on the built-in task: learnable gates on every
attention head and FFN neuron with an L1 penalty; every ``check_every`` updates the mask of the
smallest gates (``head_sparsity`` of the heads and ``ffn_sparsity`` of the neurons of each layer)
is compared with the previous one; once ``window`` consecutive distances are below
``threshold`` the search stops, the gated units are removed for real (a smaller BERT) and the
ticket is fine-tuned from the pretrained weights for ``train.num_steps``:

    python train.py --config configs/prune_earlybert.py --workdir runs/prune_earlybert

The config argument is ``head_sparsity,ffn_sparsity`` (default ``0.5,0.5``).
"""
import ml_collections

from configs import prune_magnitude


def get_config(fractions="0.5,0.5"):
    heads, ffn = (float(x) for x in fractions.split(","))
    config = prune_magnitude.get_config()
    config.train.num_steps = 300
    config.prune.method = "earlybert"
    config.prune.criterion = "gates"
    config.prune.rules = []
    config.prune.earlybert = ml_collections.ConfigDict(dict(
        head_sparsity=heads, ffn_sparsity=ffn, l1_heads=1e-4, l1_ffn=1e-4, distribution="uniform",
        check_every=10, threshold=0.02, window=3, max_search_steps=150))
    config.prune.measure_latency = True
    return config
