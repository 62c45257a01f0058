"""QAT of the fine-tuned MiniLM-L6 at W-E-A 2-2-8 (TWN weights and embeddings, 8-bit activations),
TernaryBERT-style two-stage distillation from the full-precision teacher (Zhang et al. 2020; docs/quantization.md).

    python train.py --config configs/qat_2_2_8.py --workdir runs/qat_2_2_8

With ``teacher_dir`` empty the teacher is first fine-tuned on the built-in task into
``workdir/teacher`` (~10 min on 2 CPU cores); QAT adds ~10 min.  The other bit settings
(``configs/qat_{8_8_8,4_4_8,1_1_8,2_2_4}.py``) change ``config.quant`` only.
"""
import ml_collections

from configs._builders import (MINILM_LAYERS, add_teacher, layerwise_matches, new_config, quant_config,
                               student_train_config, two_stages)
from efficient_nlp.train import default_distributed_config

LAYERS = MINILM_LAYERS


def intermediate_matches(layers=LAYERS):
    """TernaryBERT stage 1: embedding, MHA and FFN outputs, attention scores, layer by layer."""
    return layerwise_matches(layers, (("mha_out", "hidden_mse"), ("ffn_out", "hidden_mse"),
                                      ("attn_scores", "attention_mse")))


def get_config(w_bits=2, e_bits=2, a_bits=8, weight_method="", activation_method="uniform"):
    config = add_teacher(new_config("qat"))
    config.quant = quant_config(a_bits, activation_method, w_bits, e_bits, weight_method)
    config.distill = ml_collections.ConfigDict(dict(
        stages=two_stages(intermediate_matches(), steps=(200, 200), learning_rates=(1e-4, 5e-5))))
    config.train = student_train_config(weight_decay=0.01, grad_clip=1.0)
    config.distributed = default_distributed_config()
    return config
