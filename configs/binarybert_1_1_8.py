"""BinaryBERT at W-E-A 1-1-8 (docs/binarybert.md): half-width ternary QAT -> ternary weight splitting
-> binary fine-tuning, next to a BWN baseline trained directly for the same number of steps.

    python train.py --config configs/binarybert_1_1_8.py --workdir runs/binarybert_1_1_8 \\
        --config.teacher_dir=runs/quickstart/model

``config.binarybert.method``: "tws", "bwn" or "tws,bwn" (default, side by side).  With
``teacher_dir`` empty the teacher is first fine-tuned on the built-in task into
``workdir/teacher`` (~10 min on 2 CPU cores).  Step counts are sized for a CPU run (TWS: 100 + 100
ternary steps + 100 split fine-tuning steps; BWN: 100 + 200); the published setting trains each
stage for epochs.  ``configs/binarybert_1_1_4.py``: LSQ 4-bit activations.
"""
import ml_collections

from configs._builders import (MINILM_LAYERS, add_teacher, layerwise_matches, new_config, quant_config,
                               student_train_config, two_stages)
from efficient_nlp.recipes.binarybert import PREDICTION
from efficient_nlp.train import default_distributed_config

LAYERS = MINILM_LAYERS


def intermediate_matches(layers=LAYERS):
    """Stage 1 without attention scores (the half-width student has fewer heads): embedding,
    MHA and FFN outputs of every layer (TernaryBERT, docs/quantization.md)."""
    return layerwise_matches(layers, (("mha_out", "hidden_mse"), ("ffn_out", "hidden_mse")))


def get_config(a_bits=8, activation_method="uniform"):
    config = add_teacher(new_config("binarybert"))
    # Activations only: the ternary model is 2-2-a, the split and the BWN models 1-1-a.
    config.quant = quant_config(a_bits, activation_method)
    config.binarybert = ml_collections.ConfigDict(dict(
        method="tws,bwn",          # "tws" | "bwn" | "tws,bwn"
        width=0.5,                 # fraction of heads and FFN neurons the ternary model keeps
        score="magnitude",         # unit importance: magnitude | taylor
        finetune_steps=100,        # prediction-layer distillation of the split model
        finetune_learning_rate=5e-5))
    config.distill = ml_collections.ConfigDict(dict(
        stages=two_stages(intermediate_matches(), steps=(100, 100), learning_rates=(1e-4, 5e-5),
                          prediction=PREDICTION)))
    config.train = student_train_config(eval_every=0, checkpoint_every=0, weight_decay=0.01, grad_clip=1.0)
    config.distributed = default_distributed_config()
    return config
