"""QAT of the fine-tuned MiniLM-L6 at W-E-A 2-2-8 (TWN weights and embeddings, 8-bit activations),
TernaryBERT-style two-stage distillation from the full-precision teacher (METHODS.md 1.3).

    python train.py --config configs/qat_2_2_8.py --workdir runs/qat_2_2_8

With ``teacher_dir`` empty the teacher is first fine-tuned on the built-in task into
``workdir/teacher`` (~10 min on 2 CPU cores); QAT adds ~10 min.  The other bit settings
(``configs/qat_{8_8_8,4_4_8,1_1_8,2_2_4}.py``) change ``config.quant`` only.
"""
import ml_collections

from configs import distill_two_stage as distill_base
from efficient_nlp.train import default_distributed_config, default_train_config

LAYERS = 6


def intermediate_matches(layers=LAYERS):
    """TernaryBERT stage 1: embedding, MHA and FFN outputs, attention scores, layer by layer."""
    pairs = [(i, i) for i in range(layers)]
    matches = [dict(feature="embedding", loss="hidden_mse")]
    for feature, loss in (("mha_out", "hidden_mse"), ("ffn_out", "hidden_mse"), ("attn_scores", "attention_mse")):
        matches += [dict(feature=feature, loss=loss, student_layer=s, teacher_layer=t) for s, t in pairs]
    return matches


def get_config(w_bits=2, e_bits=2, a_bits=8, weight_method="", activation_method="uniform"):
    config = ml_collections.ConfigDict()
    config.recipe = "qat"
    config.model_dir = ""      # pretrained model the teacher is fine-tuned from ("" = MiniLM).
    config.teacher_dir = ""    # fine-tuned teacher (HF dir); "" = fine-tune into workdir/teacher.
    config.data = distill_base.get_config().data
    config.teacher_train = distill_base.get_config().teacher_train

    config.quant = ml_collections.ConfigDict(dict(
        w_bits=w_bits, e_bits=e_bits, a_bits=a_bits,
        weight_method=weight_method,            # "" = by bits: 1 bwn, 2 twn, else uniform
        weight_granularity="",                  # "" = channel for uniform / lsq, tensor for twn / bwn
        activation_method=activation_method,    # uniform (per-batch range) | lsq | pact
        rules=[]))                              # [[regex, None or {field: value}], ...]
    config.distill = ml_collections.ConfigDict(dict(stages=[
        dict(name="intermediate", num_steps=200, learning_rate=1e-4,
             matches=intermediate_matches(), hard_label_weight=0.0),
        dict(name="prediction", num_steps=200, learning_rate=5e-5,
             matches=[dict(feature="logits", loss="soft_ce", temperature=1.0)], hard_label_weight=0.0),
    ]))

    config.train = default_train_config()   # num_steps / learning_rate come from the stages
    config.train.update(dict(batch_size=32, eval_batch_size=128, eval_every=100,
                             checkpoint_every=100, warmup_ratio=0.1, weight_decay=0.01, grad_clip=1.0))
    config.distributed = default_distributed_config()
    return config
