"""Parameter-efficient fine-tuning of the pre-trained decoder on the built-in corpus (causal
language modelling): full fine-tuning, LoRA and QLoRA side by side (docs/peft.md).

    python train.py --config configs/lm_peft.py --workdir runs/lm_peft

The decoder is ``model_dir`` ("" = the default decoder made by configs/pretrain_causal_lm.py);
LoRA sits on every attention and FFN projection (q, k, v, o, ffn_in, ffn_gate, ffn_out), as the
QLoRA paper found necessary to match full fine-tuning.  Reports held-out perplexity.
"""
from configs import peft as base
from configs._builders import lm_data_config


def get_config():
    config = base.get_config()
    config.data = lm_data_config(128)
    config.peft.methods = "full,lora,qlora"
    config.peft.roles = "q,k,v,o,ffn_in,ffn_gate,ffn_out"
    config.train.batch_size = 16
    config.train.eval_batch_size = 16
    return config
