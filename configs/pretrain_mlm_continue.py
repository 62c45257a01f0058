"""Continue pre-training an encoder checkpoint with masked language modelling on your text
(domain-adaptive pre-training), then fine-tune it as usual.

    python train.py --config configs/pretrain_mlm_continue.py --workdir runs/mlm_continued \\
        --config.data.source=my_domain.txt --config.data.validation=my_held_out.txt
    python train.py --config configs/finetune.py --workdir runs/task --config.model_dir=runs/mlm_continued/model

``model_dir`` "default" is the embedded MiniLM-L6-H384 (its masked-LM head is new, as the checkpoint
ships none); any BERT-layout HF encoder directory or Hub id works, with its own tokenizer.
"""
import ml_collections

from configs import pretrain_mlm


def get_config():
    config = pretrain_mlm.get_config()
    config.model_dir = "default"
    config.model = ml_collections.ConfigDict(dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    config.train.num_steps = 200
    config.train.learning_rate = 1e-4
    config.train.eval_every = 50
    config.train.batch_size = 16
    return config
