"""Early exit on the fine-tuned MiniLM-L6: an exit after every layer, trained on the frozen backbone
with the final head distilled into the exits, swept over the entropy (DeeBERT), calibrated
confidence (RightTool) and patience (PABEE) rules and timed against the full model
(docs/dynamic.md).

    python train.py --config configs/early_exit.py --workdir runs/early_exit

One rule: ``--config.early_exit.rules=entropy`` (or configs/early_exit_confidence.py,
configs/early_exit_patience.py).  With ``teacher_dir`` empty the teacher is fine-tuned first
(~10 min on 2 CPU cores); training the exits takes ~4 min and the sweep ~2 min.
"""
import ml_collections

from configs._builders import add_teacher, new_config, student_train_config
from efficient_nlp.train import default_distributed_config


def early_exit_config(rules="entropy,confidence,patience", training="two_stage"):
    """``config.early_exit``: where the exits are, how they train, the rules swept and the timing."""
    return ml_collections.ConfigDict(dict(
        layers="",                 # exit after these layer counts, e.g. "2,4" ("" = every layer; the last
                                   # exit is always the model's own head)
        pooling="mean",            # what an exit reads: mean of the real tokens | first (DeeBERT's first token;
                                   # MiniLM was trained with mean pooling, so its first token says little
                                   # before the last layers)
        training=training,         # two_stage: only the exits train (backbone frozen) | joint: everything
        weights="pabee",           # per-exit loss weights: pabee (exit k weighs k) | uniform
        distill_weight=1.0,        # KL(final exit || exit k) at `temperature` (FastBERT); 0 = labels only
        temperature=1.0,
        rules=rules,               # swept rules, the first one's 1.5x point is saved with the model
        thresholds=dict(
            entropy="0.05,0.1,0.2,0.3,0.4,0.5,0.6",          # exit when normalised entropy < t
            confidence="0.99,0.97,0.95,0.9,0.8,0.7,0.6",     # exit when calibrated max probability > t
            patience="1,2,3,4,5",                            # exit when t exits in a row agree
        ),
        timing_examples=64,        # dev examples timed (batch 1 and batched)
        timing_batch=32,
        rounds=3,                  # timing rounds (median), full model and runner alternating
    ))


def get_config():
    config = add_teacher(new_config("early_exit"))
    config.early_exit = early_exit_config()
    config.train = student_train_config(num_steps=300, learning_rate=1e-3, weight_decay=0.01, keep_checkpoints=1)
    config.distributed = default_distributed_config()
    return config
