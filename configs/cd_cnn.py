"""Few-shot pruning of a small VGG-like CNN on scikit-learn's digits by cross distillation
(docs/cross_distillation.md), against L1-norm, back-prop, FitNet and layer-wise ("w/o CD") baselines.

    python train.py --config configs/cd_cnn.py --workdir runs/cd_cnn                  # unstructured
    python train.py --config configs/cd_cnn.py:structured --workdir runs/cd_cnn_struct

K = 1, 5, 10 images per class, 3 seeds, sparsity 50/70/90% (``config.sparsities``); writes
``results.md`` / ``results.json`` (methods x shots, mean +- std) and ``error_ratio.png``.  The
teacher trains in the run (about 15 s on 2 CPU cores); the whole grid takes
considerably longer than the teacher: 1000 Adam steps per layer (a K = 10 run takes minutes).
"""
import ml_collections

from configs._builders import add_fewshot_grid, cd_baselines, cd_settings, new_config


def get_config(structure="unstructured"):
    config = new_config("cross_distill", model_kind="cnn")
    add_fewshot_grid(config, structure)     # "unstructured" | "structured" (conv input channels, dense rows)
    config.error_examples = 256             # test examples for the per-layer estimation errors
    config.cnn = ml_collections.ConfigDict(dict(
        # the regime of the paper's VGG-16 on CIFAR-10: the last convs see 2x2 / 1x1 positions, so
        # with 1 image per class their output units have more free weights than the few shots have rows
        channels=(32, 32, 64, 64), pools=(False, True, True, True), hidden=64,
        teacher_steps=800, teacher_lr=2e-3, batch_size=64, teacher_seed=0,
        data_seed=0, test_fraction=0.25,
        prune_first_conv=False, prune_dense=False))  # as Bai et al.'s code: convs 1.. only
    config.cd = cd_settings(mu=0.6, alpha=0.9, beta=0.3,        # VGG-like defaults of Bai et al. 2020
                            # per layer: Adam converges on the mask (300 x 1e-3 did not)
                            steps=1000, learning_rate=1e-2, finetune_lr=1e-4)
    config.baselines = cd_baselines(learning_rate=1e-3)
    return config
