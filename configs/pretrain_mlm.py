"""Pre-train a small BERT from scratch with masked language modelling on the built-in corpus, offline.

    python train.py --config configs/pretrain_mlm.py --workdir runs/mlm
    python train.py --config configs/finetune.py --workdir runs/mlm_task --config.model_dir=runs/mlm/model

Trains a WordPiece tokenizer (4096 tokens) on the training split of the built-in corpus, then a
4-layer BERT (width 128, 2 heads, FFN 512) with the masked-LM objective (15 % of tokens: 80 %
[MASK], 10 % random, 10 % kept; new masks every step) on blocks "[CLS] ... [SEP]" of 128 tokens,
batch 32, AdamW with 6 % warmup and linear decay.  The held-out masked-LM loss (fixed masks) is
logged every ``train.eval_every`` steps with the training FLOPs and seconds so far.

Other text: ``--config.data.source=my.txt --config.data.validation=held_out.txt``.  To continue
pre-training a checkpoint instead, see configs/pretrain_mlm_continue.py.  Every run also reports
its compute (FLOPs, tokens/s, energy, CO2) and writes it to results.json.
"""
import ml_collections

from configs._builders import new_config, text_data_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config():
    config = new_config("pretrain")
    config.objective = "mlm"        # "mlm" or "electra" (configs/pretrain_electra.py).
    config.model_dir = ""           # "" = from scratch; else a HF encoder directory to continue (mlm).
    config.tokenizer = ml_collections.ConfigDict(dict(vocab_size=4096, min_frequency=2))
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=0,                # 0 = the tokenizer's size.
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=0,   # 0 = data.block_size.
        embedding_size=0,            # 0 = hidden_size (ELECTRA may use narrower embeddings).
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    ))
    config.mlm = ml_collections.ConfigDict(dict(rate=0.15))
    config.electra = ml_collections.ConfigDict(dict(generator_fraction=0.25, disc_weight=50.0))
    config.stacking = ml_collections.ConfigDict(dict(
        enabled=False,
        first_steps=0,               # steps of the half-depth model before it is stacked.
        optimizer="carry",           # "carry": Adam moments copied and schedule continued; "reset".
    ))
    config.data = text_data_config()
    config.train = train_config(num_steps=600, batch_size=32, eval_batch_size=64, learning_rate=1e-3,
                                warmup_ratio=0.06, weight_decay=0.01, grad_clip=1.0, adam_b2=0.98,
                                log_every=25, eval_every=100, checkpoint_every=100)
    config.distributed = default_distributed_config()
    return config
