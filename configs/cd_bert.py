"""Few-shot pruning of a fine-tuned BERT (MiniLM-L6 on the built-in task) by cross distillation
(docs/cross_distillation.md), every dense layer of every encoder layer in order.

    python train.py --config configs/cd_bert.py --workdir runs/cd_bert                 # unstructured
    python train.py --config configs/cd_bert.py:structured --workdir runs/cd_bert_heads  # heads + FFN neurons

K = 1, 5, 10 texts per class (9 classes), 3 seeds, sparsity 50/70/90%.  Structured pruning
removes heads (row blocks of ``attention.output``) and FFN neurons (rows of ``ffn.output``), so
`efficient_nlp.prune.shrink` can remove them for real.  With ``teacher_dir`` empty the teacher
is fine-tuned first into ``workdir/teacher`` (~10 min on 2 CPU cores); the full grid (6 methods
x 3 K x 3 seeds x 3 sparsities, 36 layers each) takes hours on CPU: narrow ``sparsities``,
``seeds`` or ``methods`` there, or run it on an accelerator.
"""
from configs._builders import add_fewshot_grid, add_teacher, cd_baselines, cd_settings, new_config
from efficient_nlp.train import default_distributed_config


def get_config(structure="unstructured"):
    config = add_teacher(new_config("cross_distill", model_kind="bert"))
    config.distributed = default_distributed_config()
    config.max_eval_examples = 0     # 0: the whole dev split
    add_fewshot_grid(config, structure)   # "unstructured" | "structured" (heads + FFN neurons)
    config.error_examples = 64
    config.save_models = False       # True: every pruned student as a HF dir under workdir/models/
    config.cd = cd_settings(mu=0.9, alpha=0.9, beta=0.5,   # residual-net defaults of Bai et al. 2020
                            steps=300, learning_rate=1e-3, finetune_lr=1e-5)
    config.baselines = cd_baselines(learning_rate=1e-4)
    return config
