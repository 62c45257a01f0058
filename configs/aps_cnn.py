"""APS width search on the digits images with a ResNet-20-style CNN (docs/nas.md).

    python train.py --config configs/aps_cnn.py:transitional --workdir runs/aps_cnn_t
    python train.py --config configs/aps_cnn_ordinal.py --workdir runs/aps_cnn_o \
        --config.search.budget_fraction=0.5

The argument is the sharing kind (ordinal | independent | transitional).  12 decisions (each
stage's width and each block's inner width, candidates 25/50/75/100% of 16/32/64 channels);
600 search steps (1/3 uniform warm-up) then 600 steps of retraining from scratch.  About 3-4
minutes on 2 CPU cores.  ``search.budget_fraction=0.5`` searches under a 50% FLOPs budget.
"""
import ml_collections

from configs._builders import new_config, train_config
from efficient_nlp.nas.search import default_search_config
from efficient_nlp.train import default_distributed_config


def get_config(sharing="transitional"):
    config = new_config("nas", seed=0)
    config.space = ml_collections.ConfigDict(dict(
        kind="cnn", blocks_per_stage=3, base_widths=(16, 32, 64), ratios=(0.25, 0.5, 0.75, 1.0),
        val_fraction=0.2))
    config.search = default_search_config()
    config.search.sharing = sharing
    config.search.num_steps = 600
    config.search.batch_size = 64
    config.search.learning_rate = 3e-3
    config.search.anneal_tau = 2e-4  # Phi of these layers halves over ~300 annealing steps
    config.retrain = train_config(
        num_steps=600, batch_size=64, eval_batch_size=512, learning_rate=3e-3, warmup_ratio=0.05,
        weight_decay=1e-4, eval_every=200, checkpoint_every=200, log_every=50, tensorboard=False,
        progress_bar=False)
    config.distributed = default_distributed_config()
    return config
