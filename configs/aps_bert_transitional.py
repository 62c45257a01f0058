"""APS-T width search of the embedded MiniLM-L6-H384 (heads and FFN width of every layer) on the
built-in task, starting from the pretrained weights (ordinal start: the widest candidate is the
pretrained model), under a 50% FLOPs budget; the chosen smaller BERT inherits its candidate
kernels and is fine-tuned, then saved as a HF directory ``workdir/model``.

    python train.py --config configs/aps_bert_transitional.py --workdir runs/aps_bert_t

Sized for a GPU/TPU (about 10 minutes on one); on 2 CPU cores lower search.num_steps.
"""
import ml_collections

from configs._builders import new_config, train_config
from efficient_nlp.nas.search import default_search_config
from efficient_nlp.train import default_distributed_config


def get_config():
    config = new_config("nas", seed=0)
    config.space = ml_collections.ConfigDict(dict(
        kind="bert", model_dir="", task="builtin", max_length=64, max_train_examples=0,
        head_ratios=(0.25, 0.5, 0.75, 1.0), ffn_ratios=(0.25, 0.5, 0.75, 1.0), val_fraction=0.2,
        retrain_init="inherit"))
    config.search = default_search_config()
    config.search.update(dict(
        sharing="transitional", num_steps=600, batch_size=32, eval_batch_size=128,
        learning_rate=5e-5, weight_decay=0.01, warmup_fraction=1 / 3, controller_samples=4,
        budget_fraction=0.5, anneal_every=10, anneal_tau=2e-6, log_every=50, checkpoint_every=200,
        alignment=False))
    config.retrain = train_config(
        num_steps=600, batch_size=32, eval_batch_size=128, learning_rate=1e-4, eval_every=200,
        checkpoint_every=200, tensorboard=False, progress_bar=False)
    config.distributed = default_distributed_config()
    return config
