"""Few-shot pruning of a fine-tuned BERT (MiniLM-L6 on the built-in task) by cross distillation
(METHODS.md 2.2), every dense layer of every encoder layer in order.

    python train.py --config configs/cd_bert.py --workdir runs/cd_bert                 # unstructured
    python train.py --config configs/cd_bert.py:structured --workdir runs/cd_bert_heads  # heads + FFN neurons

K = 1, 5, 10 texts per class (9 classes), 3 seeds, sparsity 50/70/90%.  Structured pruning
removes heads (row blocks of ``attention.output``) and FFN neurons (rows of ``ffn.output``), so
`efficient_nlp.prune.shrink` can remove them for real.  With ``teacher_dir`` empty the teacher
is fine-tuned first into ``workdir/teacher`` (~10 min on 2 CPU cores); the full grid (6 methods
x 3 K x 3 seeds x 3 sparsities, 36 layers each) takes hours on CPU: narrow ``sparsities``,
``seeds`` or ``methods`` there, or run it on an accelerator.
"""
import ml_collections

from efficient_nlp.train import default_distributed_config, default_train_config


def get_config(structure="unstructured"):
    config = ml_collections.ConfigDict()
    config.recipe = "cross_distill"
    config.model_kind = "bert"
    config.model_dir = ""      # pretrained model the teacher is fine-tuned from ("" = MiniLM).
    config.teacher_dir = ""    # fine-tuned teacher (HF dir); "" = fine-tune into workdir/teacher.
    config.data = ml_collections.ConfigDict(dict(
        task="builtin", data_dir="", train_file="", dev_file="", text_a="", text_b="",
        label="", num_labels=0, max_length=64, max_train_examples=0))
    config.teacher_train = default_train_config()     # as configs/quickstart.py
    config.teacher_train.update(dict(num_steps=300, batch_size=32, learning_rate=1e-4,
                                     eval_every=100, checkpoint_every=100))
    config.distributed = default_distributed_config()
    config.max_eval_examples = 0     # 0: the whole dev split
    config.structure = structure     # "unstructured" | "structured" (heads + FFN neurons)
    config.sparsities = (0.5, 0.7, 0.9)
    config.shots = (1, 5, 10)
    config.seeds = (0, 1, 2)
    config.methods = ("l1", "bp", "fitnet", "wo_cd", "cd", "scd")
    config.error_examples = 64
    config.save_models = False       # True: every pruned student as a HF dir under workdir/models/
    config.cd = ml_collections.ConfigDict(dict(
        mu=0.9, alpha=0.9, beta=0.5,     # residual-net defaults of METHODS 2.2
        sparsifier="topk", lam_extra=0.0,
        steps=300, learning_rate=1e-3, ramp=1 / 3,
        finetune_steps=0, finetune_lr=1e-5))
    config.baselines = ml_collections.ConfigDict(dict(
        bp_steps=200, bp_lr=1e-4, fitnet_steps=200, fitnet_lr=1e-4))
    return config
