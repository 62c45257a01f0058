"""Parameter-efficient fine-tuning of the embedded MiniLM-L6-H384 on the built-in task: full
fine-tuning, LoRA, Houlsby adapters and QLoRA side by side (docs/peft.md).

    python train.py --config configs/peft.py --workdir runs/peft

Fewer rows: ``--config.peft.methods=lora,qlora``.  Every method runs ``train.num_steps`` updates
from the pretrained model (the task head is fresh and trains in every method); the added
parameters train at a higher learning rate than full fine-tuning, as in the LoRA and adapter
papers.  Sized for 2 CPU cores: about 5 minutes per method.
"""
import ml_collections

from configs._builders import data_config, new_config, train_config
from efficient_nlp.train import default_distributed_config


def peft_config(methods="full,lora,adapters,qlora"):
    """``config.peft``: the methods and their settings."""
    return ml_collections.ConfigDict(dict(
        methods=methods,
        roles="q,v",               # LoRA sites (family roles: q, k, v, o, ffn_in, ffn_gate, ffn_out)
        rank=8,
        alpha=16.0,                # LoRA scale = alpha / rank
        dropout=0.05,              # on the LoRA branch's input
        adapter_size=64,           # Houlsby bottleneck width
        adapter_roles="o,ffn_out",  # after the attention output and the FFN output projections
        grid="nf4",                # QLoRA base: "nf4" or "int4"
        block_size=64,             # QLoRA: weights per absmax scale
        double_quant=True,         # QLoRA: quantize the scales too (blocks of 256)
        seed=0,
        learning_rates=dict(full=1e-4, lora=1e-3, adapters=1e-3, qlora=1e-3),
        save_merged=False,         # also write the merged LoRA model (HF directory) under lora/merged
    ))


def get_config():
    config = new_config("peft")
    config.model_dir = ""          # pretrained model ("" = the embedded MiniLM)
    config.data = data_config()
    config.peft = peft_config()
    config.train = train_config(num_steps=300, batch_size=32, learning_rate=1e-4, eval_every=100,
                                checkpoint_every=100, keep_checkpoints=1)
    config.distributed = default_distributed_config()
    return config
