"""Parameter-efficient fine-tuning: LoRA (Hu et al. 2021), bottleneck adapters (Houlsby et al.
2019) and QLoRA's 4-bit frozen base (Dettmers et al. 2023); see docs/peft.md.

    from efficient_nlp import peft, train
    lora_model, report = peft.add_lora(model, roles=("q", "v"), rank=8, alpha=16.0)
    print(report)                                   # targets, trainable / total parameters
    trained, _ = train.run(lora_model, loss_fn, optax.adamw(1e-3), batches, steps=100,
                           trainable=peft.trainable(lora_model))   # LoRA + head only
    peft.save_adapter(trained, "adapter.safetensors", head=True)   # a few MB
    peft.save_peft_dir(trained, "peft_dir")         # HF PEFT's adapter_config.json + tensors
    deployed = peft.merge(trained)                  # plain Linears again, no extra matmul
"""
from efficient_nlp.peft import qlora  # noqa: F401
from efficient_nlp.peft.adapters import AdapterLinear, AdapterParam, add_adapters
from efficient_nlp.peft.io import (
    adapter_state,
    attach_adapter,
    load_adapter,
    load_peft_dir,
    read_adapter,
    save_adapter,
    save_peft_dir,
    unmerge,
)
from efficient_nlp.peft.lora import (
    LoraLinear,
    LoraParam,
    PeftError,
    PeftParam,
    PeftReport,
    PeftWrapper,
    add_lora,
    dequantize_base,
    merge,
    trainable,
)

__all__ = ["AdapterLinear", "AdapterParam", "LoraLinear", "LoraParam", "PeftError", "PeftParam", "PeftReport",
           "PeftWrapper", "adapter_state", "add_adapters", "add_lora", "attach_adapter", "dequantize_base",
           "load_adapter", "load_peft_dir", "merge", "qlora", "read_adapter", "save_adapter", "save_peft_dir",
           "trainable", "unmerge"]
