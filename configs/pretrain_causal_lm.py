"""Pre-train a small Llama-style decoder from scratch on the built-in corpus, offline.

    python train.py --config configs/pretrain_causal_lm.py --workdir runs/decoder

Trains a byte-level BPE tokenizer (4096 tokens) on the training split of the built-in corpus
(`efficient_nlp.data.builtin_corpus`: about 0.43 M tokens, 3366 blocks of 128), then a
4.0 M-parameter Llama-style decoder (4 layers, width 256, 4 query / 2 key-value heads,
SwiGLU FFN 704, rotary positions, RMSNorm, tied embeddings) for 1000 steps of 32 x 128
tokens (about 9.5 epochs) with AdamW, 5 % warmup and linear decay.  The held-out perplexity
on the "validation" split (182 blocks of 128 tokens, each scored on its last 127 tokens) is
logged every 200 steps and printed before and after training (about 4350 before: a
uniform guess over the vocabulary).

Measured (2 CPU cores, shared with test runs for part of the time): 1000 steps in 35.7 min
(1,913 training tokens/s; 1.6-1.7 s per step when the cores were free); held-out perplexity
4349 -> 164, 83, 57, 47, 43.2 at steps 200 .. 1000 (still falling: no over-fitting), token
accuracy 0.297.  Interrupted, the same command resumes from the latest checkpoint (every 100
steps).

Outputs: ``runs/decoder/results.json`` (parameters, training tokens and tokens/s, held-out
perplexity and token accuracy before/after, wall time) and ``runs/decoder/model`` (the model
and its tokenizer as a HF directory: ``models.from_pretrained``, or ``transformers``'
``LlamaForCausalLM``), which is also copied to ``models.default_decoder_dir()``
(``~/.cache/efficient_nlp/decoder``, or ``$EFFICIENT_NLP_DECODER_DIR``), where
configs/finetune_causal_lm.py starts from.  ``--config.publish_default=False`` skips the copy.
"""
import ml_collections

from configs._builders import new_config, text_data_config, train_config
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
    config.data = text_data_config()
    config.train = train_config(num_steps=1000, batch_size=32, eval_batch_size=32, learning_rate=2e-3,
                                warmup_ratio=0.05, weight_decay=0.1, grad_clip=1.0, adam_b2=0.95,
                                log_every=25, eval_every=200, checkpoint_every=100)
    config.distributed = default_distributed_config()
    return config
