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

from efficient_nlp.distill import layer_matches, uniform_hidden_map
from efficient_nlp.train import default_distributed_config, default_train_config

TEACHER_LAYERS, STUDENT_LAYERS = 6, 3


def intermediate_matches():
    hidden = uniform_hidden_map(TEACHER_LAYERS, STUDENT_LAYERS)          # (0,0), (1,2), (2,4), (3,6)
    attention = [(i, 2 * i + 1) for i in range(STUDENT_LAYERS)]         # (0,1), (1,3), (2,5)
    return (layer_matches("hidden", "hidden_mse", hidden)
            + layer_matches("attn_scores", "attention_mse", attention))


def prediction_matches(temperature=1.0):
    return [dict(feature="logits", loss="soft_ce", temperature=temperature)]


def get_config():
    config = ml_collections.ConfigDict()
    config.recipe = "distill"
    config.model_dir = ""      # pretrained model the teacher is fine-tuned from ("" = MiniLM).
    config.teacher_dir = ""    # fine-tuned teacher (HF dir); "" = fine-tune into workdir/teacher.
    config.data = ml_collections.ConfigDict(dict(
        task="builtin", data_dir="", train_file="", dev_file="", text_a="", text_b="",
        label="", num_labels=0, max_length=64, max_train_examples=0))

    config.teacher_train = default_train_config()     # as configs/quickstart.py
    config.teacher_train.update(dict(num_steps=300, batch_size=32, learning_rate=1e-4,
                                     eval_every=100, checkpoint_every=100))

    config.student = ml_collections.ConfigDict(dict(
        layers=(0, 2, 4),
        init="teacher",   # copy the layers from the fine-tuned teacher, or "pretrained" (model_dir)
        overrides=dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)))
    config.distill = ml_collections.ConfigDict(dict(
        method="kd",
        cache_teacher_logits=False,   # True: teacher logits computed once to workdir/teacher_logits.npz
        labelled_examples=0,          # N > 0: only N training texts keep labels (transfer set)
        replace_rate=dict(kind="constant", value=0.5),  # theseus only (a schedule)
        stages=[
            dict(name="intermediate", num_steps=200, learning_rate=2e-4,
                 matches=intermediate_matches(), hard_label_weight=0.0),
            dict(name="prediction", num_steps=200, learning_rate=1e-4,
                 matches=prediction_matches(), hard_label_weight=0.0),
        ]))
    config.baseline = ml_collections.ConfigDict(dict(
        enabled=False, num_steps=0, learning_rate=0.0))  # 0: total distillation steps / last lr

    config.train = default_train_config()   # num_steps / learning_rate come from the stages
    config.train.update(dict(batch_size=32, eval_batch_size=128, eval_every=100,
                             checkpoint_every=100, warmup_ratio=0.1))
    config.distributed = default_distributed_config()
    return config
