"""Token skipping by learned thresholds (LTP, Kim et al. 2022) on the fine-tuned MiniLM-L6: a
threshold per layer on the attention each token receives, learned with soft masks and an L1
penalty, then the model fine-tuned with tokens removed for real; swept and timed against the full
model (docs/dynamic.md).

    python train.py --config configs/token_skip.py --workdir runs/token_skip

PoWER-BERT instead: configs/token_skip_power.py.  With ``teacher_dir`` empty the teacher is
fine-tuned first (~10 min on 2 CPU cores); the two stages take ~6 min and the sweep ~2 min.
"""
import ml_collections

from configs._builders import add_teacher, new_config, student_train_config
from efficient_nlp.train import default_distributed_config


def token_skip_config(method="ltp"):
    """``config.token_skip``: the method, its two training stages, the sweep and the timing."""
    return ml_collections.ConfigDict(dict(
        method=method,             # ltp | power
        penalty=0.1,               # lambda of the L1 term (LTP: mean soft mask; PoWER: retention weights)
        temperature=2e-3,          # LTP soft mask sigmoid((s - theta) / temperature), s = mean attention received
                                   # (~1/n for n tokens)
        soft_steps=200,            # model + retention parameters, soft masks
        soft_learning_rate=5e-5,   # the model's
        skip_learning_rate=2e-3,   # the thresholds' (LTP) / retention weights' (PoWER)
        hard_steps=100,            # model only, tokens removed for real
        hard_learning_rate=2e-5,
        scales="0.5,0.75,1,1.25,1.5,2,3",  # sweep: learned thresholds (LTP) / counts (PoWER) times each
        timing_examples=64,        # dev examples timed (batch 1 and batched)
        timing_batch=32,
        rounds=3,
    ))


def get_config():
    config = add_teacher(new_config("token_skip"))
    config.token_skip = token_skip_config()
    config.train = student_train_config(weight_decay=0.01, keep_checkpoints=1)
    config.distributed = default_distributed_config()
    return config
