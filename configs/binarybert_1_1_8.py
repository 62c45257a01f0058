"""BinaryBERT at W-E-A 1-1-8 (METHODS.md 1.5): half-width ternary QAT -> ternary weight splitting
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

from configs import distill_two_stage as distill_base
from efficient_nlp.recipes.binarybert import PREDICTION
from efficient_nlp.train import default_distributed_config, default_train_config

LAYERS = 6


def intermediate_matches(layers=LAYERS):
    """Stage 1 without attention scores (the half-width student has fewer heads): embedding,
    MHA and FFN outputs of every layer (METHODS.md 1.3)."""
    matches = [dict(feature="embedding", loss="hidden_mse")]
    for feature in ("mha_out", "ffn_out"):
        matches += [dict(feature=feature, loss="hidden_mse", student_layer=i, teacher_layer=i) for i in range(layers)]
    return matches


def get_config(a_bits=8, activation_method="uniform"):
    config = ml_collections.ConfigDict()
    config.recipe = "binarybert"
    config.model_dir = ""      # pretrained model the teacher is fine-tuned from ("" = MiniLM).
    config.teacher_dir = ""    # fine-tuned teacher (HF dir); "" = fine-tune into workdir/teacher.
    config.data = distill_base.get_config().data
    config.teacher_train = distill_base.get_config().teacher_train
    # Activations only: the ternary model is 2-2-a, the split and the BWN models 1-1-a.
    config.quant = ml_collections.ConfigDict(dict(
        a_bits=a_bits,
        activation_method=activation_method,    # uniform (per-batch range) | lsq | pact
        rules=[]))                              # [[regex, None or {field: value}], ...]
    config.binarybert = ml_collections.ConfigDict(dict(
        method="tws,bwn",          # "tws" | "bwn" | "tws,bwn"
        width=0.5,                 # fraction of heads and FFN neurons the ternary model keeps
        score="magnitude",         # unit importance: magnitude | taylor
        finetune_steps=100,        # prediction-layer distillation of the split model
        finetune_learning_rate=5e-5))
    config.distill = ml_collections.ConfigDict(dict(stages=[
        dict(name="intermediate", num_steps=100, learning_rate=1e-4,
             matches=intermediate_matches(), hard_label_weight=0.0),
        dict(name="prediction", num_steps=100, learning_rate=5e-5, matches=PREDICTION, hard_label_weight=0.0),
    ]))
    config.train = default_train_config()   # num_steps / learning_rate come from the stages
    config.train.update(dict(batch_size=32, eval_batch_size=128, eval_every=0, checkpoint_every=0,
                             warmup_ratio=0.1, weight_decay=0.01, grad_clip=1.0))
    config.distributed = default_distributed_config()
    return config
