"""One-shot post-training compression of the fine-tuned MiniLM-L6, side by side: RTN, GPTQ, AWQ,
SmoothQuant, REM, MREM-S, MREM-P and GPTQ + MREM-S at W4 (groups of 128), W3 and W2 weight-only,
W8A8 and W4A8; SparseGPT, Wanda and magnitude pruning at 50% and 2:4, and SparseGPT 2:4 with
4-bit weights in one pass (docs/oneshot.md).

    python train.py --config configs/oneshot.py --workdir runs/oneshot \
        --config.teacher_dir=runs/quickstart/model

Fewer rows: ``--config.oneshot.settings=w4g128,w8a8 --config.oneshot.methods=rtn,gptq``.
With ``teacher_dir`` empty the teacher is fine-tuned first (~10 min on 2 CPU cores).  The REM /
MREM step counts are sized for 2 CPU cores (``oneshot.mrem.steps``; the published 2,000 per module
takes hours there).
"""
import ml_collections

from configs._builders import add_teacher, new_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config(settings="w4g128,w3,w2,w8a8,w4a8"):
    config = add_teacher(new_config("oneshot"))
    config.oneshot = ml_collections.ConfigDict(dict(
        settings=settings,           # w<bits>[g<group>][a<bits>]; no a = activations in float
        methods="rtn,gptq,awq,smoothquant,rem,mrem_s,mrem_p,gptq+mrem_s",
        prune="sparsegpt,wanda,magnitude,sparsegpt+gptq",
        sparsities="0.5,2:4",        # unstructured fraction pruned, or N:M (N of every M inputs kept)
        prune_bits="w4",             # the weights of sparsegpt+gptq
        calibration_size=128,        # training rows (sequences) read; the one-shot literature uses 128
        seed=0,
        batch_size=32,               # calibration rows per forward pass
        activation_method="pact",    # static per-tensor activation ranges (min / max of one batch)
        damp=0.01,                   # GPTQ / SparseGPT: lambda = damp * mean(diag H)
        act_order=False,             # GPTQ: inputs in decreasing order of diag(H)
        smoothquant_alpha=0.5,
        rem_steps=100,               # per matmul
        mrem=dict(num_modules=3, steps=100, learning_rate=1e-4),
        save_packed=False,           # keep every packed artefact under workdir/<setting>/<method>
    ))
    config.train = train_config(eval_batch_size=128, progress_bar=False)   # only eval_batch_size is used
    config.distributed = default_distributed_config()
    return config
