"""BinaryBERT adaptive splitting at W-E-A 1-1-8 (docs/binarybert_adaptive.md): a family of binary models between
"all binary" and "everything split", chosen by sensitivity + exact knapsack, against random and
uniform assignments under the same budgets (`efficient_nlp.recipes.adaptive_split`).

    python train.py --config configs/binarybert_adaptive.py --workdir runs/binarybert_adaptive \\
        --config.teacher_dir=runs/quickstart/model \\
        --config.adaptive.ternary_dir=runs/binarybert_1_1_8/half_width_ternary/packed

Without ``ternary_dir`` the half-width ternary model is trained first exactly as in
``configs/binarybert_1_1_8.py`` (its ``binarybert`` / ``distill`` settings are inherited).  Every
distinct assignment is fine-tuned for ``binarybert.finetune_steps`` steps of prediction-layer
distillation: with the defaults (5 budgets x 3 methods, endpoints shared) about 11 fine-tunings.
"""
import ml_collections

from configs import binarybert_1_1_8 as base


def get_config(a_bits=8, activation_method="uniform"):
    config = base.get_config(a_bits, activation_method)
    config.recipe = "binarybert_adaptive"
    config.binarybert.method = "tws"    # the ternary model of the TWS branch (trained only without ternary_dir)
    config.adaptive = ml_collections.ConfigDict(dict(
        ternary_dir="",                 # packed half-width ternary artefact ("" = train it here)
        budgets=[0.0, 0.25, 0.5, 0.75, 1.0],   # C = C0 + f (C_full - C0): 0 all binary, 1 all split
        methods="knapsack,random,uniform",
        cost="size_mb",                 # size_mb | flops | bops
        by="part_layer",                # sensitivity groups: part_layer | layer | part
        uniform_by="part",              # uniform baseline: the same part in every layer | whole layers
        reference="binary",             # sensitivity: gain vs all binary (BinaryBERT) | loss vs all split
        sensitivity_examples=256,       # seeded sample of the training split (dev stays untouched)
        seed=0))                        # the sample and the random baseline
    return config
