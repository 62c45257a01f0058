"""Pre-train a small Llama-style decoder from scratch on the built-in corpus, offline.

    python train.py --config configs/pretrain_causal_lm.py --workdir runs/decoder

PLACEHOLDER
"""
import ml_collections

from configs._builders import new_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config():
    config = new_config("causal_lm")
    config.model_dir = ""          # "" = from scratch (see efficient_nlp.recipes.causal_lm).
    config.publish_default = True  # copy workdir/model to models.default_decoder_dir().
    config.tokenizer = ml_collections.ConfigDict(dict(vocab_size=4096, min_frequency=2))
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=0,                # 0 = the tokenizer's size.
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,       # grouped-query attention: 2 query heads per key/value head.
        intermediate_size=704,       # SwiGLU FFN.
        max_position_embeddings=0,   # 0 = data.block_size.
        hidden_act="silu",
        norm_type="rmsnorm",
        norm_eps=1e-5,
        position_type="rotary",
        rope_theta=10000.0,
        gated_ffn=True,
        tie_word_embeddings=True,
        hidden_dropout_prob=0.1,     # about 10 epochs over 0.43 M training tokens: some regularisation.
        attention_probs_dropout_prob=0.0,
        embedding_dropout_prob=0.0,
        initializer_range=0.02,
    ))
    config.data = ml_collections.ConfigDict(dict(
        source="builtin",           # "builtin", a local .txt/.jsonl/.parquet file or a hub dataset name.
        split="train",              # split of "builtin" / hub sources.
        validation="validation",    # held-out split of the source, or a held-out file.
        text_column="text",
        hub_config="",
        block_size=128,
        max_documents=0,            # 0 = all.
        max_validation_documents=0,
    ))
    config.train = train_config(num_steps=1000, batch_size=32, eval_batch_size=32, learning_rate=2e-3,
                                warmup_ratio=0.05, weight_decay=0.1, grad_clip=1.0, adam_b2=0.95,
                                log_every=25, eval_every=200, checkpoint_every=100)
    config.distributed = default_distributed_config()
    return config
