"""Gradual magnitude pruning (Zhu & Gupta 2017) of the encoder's weight matrices while
fine-tuning on the built-in task; the target sparsity is the config argument (0.5, 0.7, 0.9):

    python train.py --config configs/prune_magnitude.py:0.9 --workdir runs/prune_mag90

Cubic ramp from the end of the LR warmup (10% of training) to 60%, masks recomputed every 10
steps (no pruning during warmup: movement scores collected through the still-random classifier
head would decide irreversibly which pretrained weights are zeroed); global ranking with
per-tensor normalisation over all attention / FFN kernels.
"""
import ml_collections

from configs import quickstart


def get_config(sparsity="0.9"):
    config = quickstart.get_config()
    config.recipe = "prune"
    config.train.num_steps = 300
    config.train.checkpoint_every = 100
    steps = config.train.num_steps
    config.prune = ml_collections.ConfigDict(dict(
        criterion="magnitude",
        schedule=dict(kind="gradual_cubic", begin_step=int(config.train.warmup_ratio * steps),
                      end_step=int(0.6 * steps), frequency=10),
        rules=[dict(regex=r"layers\.\d+\.(attention\.(query|key|value|output)|ffn\.(intermediate|output))\.kernel$",
                    pattern="unstructured", sparsity=float(sparsity), distribution="global")],
        shrink=False,
        measure_latency=True,
    ))
    return config
