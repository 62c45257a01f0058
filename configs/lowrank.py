"""Low-rank factorisation of the fine-tuned MiniLM-L6: every attention and FFN Linear as the
truncated SVD at rank 128 and at rank 64 (of d = 384), each recovered by two-stage distillation
(docs/lowrank.md).

    python train.py --config configs/lowrank.py --workdir runs/lowrank

Other choices: ``--config.lowrank.method=fwsvd`` (Fisher-weighted, Hsu et al. 2022) or ``asvd``
(activation-aware); ``--config.lowrank.settings=e0.9`` (90% of the spectrum's energy per kernel),
``p0.5`` (half the dense parameters of those Linears, ranks chosen across sites);
``--config.lowrank.embedding_dim=128`` also factorises the word embedding (ALBERT).  With
``teacher_dir`` empty the teacher is fine-tuned first (~10 min on 2 CPU cores); each setting's
recovery adds ~8 min.
"""
import ml_collections

from configs._builders import add_teacher, new_config, student_train_config
from configs.sharing import recovery_stages
from efficient_nlp.train import default_distributed_config


def get_config():
    config = add_teacher(new_config("lowrank"))
    config.lowrank = ml_collections.ConfigDict(dict(
        settings="r128,r64",         # r<rank> | e<energy> | p<params budget> | f<FLOPs budget>, comma-separated
        method="svd",                # svd | fwsvd | asvd
        roles="q,k,v,o,ffn_in,ffn_gate,ffn_out",
        embedding_dim=0,             # > 0: factorise the word embedding to V x E, E x H (ALBERT)
        fisher_batches=8,            # fwsvd: training batches summed into the Fisher information
        calibration_size=128,        # asvd: training rows whose mean |x| scales the input channels
        alpha=0.5,                   # asvd: the scale is mean|x| ** alpha
    ))
    config.distill = ml_collections.ConfigDict(dict(stages=recovery_stages()))
    config.train = student_train_config(weight_decay=0.01, grad_clip=1.0)
    config.distributed = default_distributed_config()
    return config
