"""Fine-tune a decoder (GPT-2, Llama, Qwen2, Mistral HF directory) on your own text.

    python train.py --config configs/finetune_causal_lm.py --workdir runs/notes \
        --config.data.source=notes.txt --config.data.validation=held_out.txt

``model_dir`` defaults to ``"default"``: the small decoder that configs/pretrain_causal_lm.py
pre-trains on the built-in corpus (`efficient_nlp.models.default_decoder_dir`); pass any
local decoder directory (or a Hub id, online) instead; its own tokenizer is used.
``data.source`` is a local ``.txt`` (documents separated by blank lines), ``.jsonl`` or
``.parquet`` file (a ``text`` column); ``data.validation`` a held-out file of the same kind
(or, for a Hub dataset source, the name of its held-out split).

Prints the held-out perplexity before and after fine-tuning; ``runs/notes/results.json``
holds it with the training statistics, and ``runs/notes/model`` the fine-tuned model with
its tokenizer as a HF directory (``models.from_pretrained``).
"""
import ml_collections

from configs._builders import new_config, text_data_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config():
    config = new_config("causal_lm")
    config.model_dir = "default"   # = models.default_decoder_dir(); or a decoder HF directory.
    config.publish_default = False
    config.model = ml_collections.ConfigDict(dict(  # dropout overrides (the architecture is the checkpoint's)
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, embedding_dropout_prob=0.0))
    config.data = text_data_config(source="", validation="")
    config.train = train_config(num_steps=300, batch_size=16, eval_batch_size=32, learning_rate=3e-4,
                                warmup_ratio=0.05, weight_decay=0.1, grad_clip=1.0, adam_b2=0.95,
                                log_every=25, eval_every=100, checkpoint_every=100)
    config.distributed = default_distributed_config()
    return config
