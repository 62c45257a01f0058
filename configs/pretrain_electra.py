"""Pre-train a small ELECTRA from scratch on the built-in corpus: replaced-token detection with a
generator a quarter of the discriminator's width and shared embeddings, L = L_MLM + 50 * L_disc.

    python train.py --config configs/pretrain_electra.py --workdir runs/electra
    python train.py --config configs/finetune.py --workdir runs/electra_task --config.model_dir=runs/electra/model

The discriminator has the architecture of configs/pretrain_mlm.py's BERT; it is saved as an
ELECTRA HF directory (``runs/electra/model``), the generator next to it (``runs/electra/generator``).
"""
from configs import pretrain_mlm


def get_config():
    config = pretrain_mlm.get_config()
    config.objective = "electra"
    return config
