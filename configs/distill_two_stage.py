"""Distil the fine-tuned MiniLM-L6 into a 3-layer student, TinyBERT-style, in two stages.

    python train.py --config configs/distill_two_stage.py --workdir runs/distill

Stage ``intermediate``: embedding and hidden-state MSE (uniform map: student hidden i <- teacher
hidden 2i) and attention-score MSE (student layer i <- teacher layer 2i+1); stage
``prediction``: soft cross-entropy on the logits.  The student starts from the teacher's layers
0, 2, 4.  With ``teacher_dir`` empty the teacher is first fine-tuned on the built-in task into
``workdir/teacher`` (~10 min on 2 CPU cores); distillation adds ~5-10 min.  Set
``--config.baseline.enabled=True`` to also train the same student without distillation.
"""
import ml_collections

from configs._builders import (MINILM_LAYERS, add_teacher, new_config, prediction_matches, student_train_config,
                               two_stages)
from efficient_nlp.distill import layer_matches, uniform_hidden_map
from efficient_nlp.train import default_distributed_config

TEACHER_LAYERS, STUDENT_LAYERS = MINILM_LAYERS, 3


def intermediate_matches():
    hidden = uniform_hidden_map(TEACHER_LAYERS, STUDENT_LAYERS)          # (0,0), (1,2), (2,4), (3,6)
    attention = [(i, 2 * i + 1) for i in range(STUDENT_LAYERS)]         # (0,1), (1,3), (2,5)
    return (layer_matches("hidden", "hidden_mse", hidden)
            + layer_matches("attn_scores", "attention_mse", attention))


def get_config():
    config = add_teacher(new_config("distill"))
    config.student = ml_collections.ConfigDict(dict(
        layers=(0, 2, 4),
        init="teacher",   # copy the layers from the fine-tuned teacher, or "pretrained" (model_dir)
        overrides=dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)))
    config.distill = ml_collections.ConfigDict(dict(
        method="kd",
        cache_teacher_logits=False,   # True: teacher logits computed once to workdir/teacher_logits.npz
        labelled_examples=0,          # N > 0: only N training texts keep labels (transfer set)
        replace_rate=dict(kind="constant", value=0.5),  # theseus only (a schedule)
        stages=two_stages(intermediate_matches(), steps=(200, 200), learning_rates=(2e-4, 1e-4),
                          prediction=prediction_matches())))
    config.baseline = ml_collections.ConfigDict(dict(
        enabled=False, num_steps=0, learning_rate=0.0))  # 0: total distillation steps / last lr
    config.train = student_train_config()
    config.distributed = default_distributed_config()
    return config
