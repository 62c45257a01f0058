"""Distillation with a transfer set: few labelled texts, the teacher labels the rest.

    python train.py --config configs/distill_transfer.py --workdir runs/distill_transfer

Only 256 of the built-in task's training texts keep their labels (a seeded subset); the 2-layer
student (teacher layers 2 and 5) is distilled on every training text in one stage: KL on the
logits at T=2 (times T^2) against the teacher's cached logits, plus the hard-label loss (weight
0.5) on the labelled rows only (Hinton et al. 2015's transfer set; Turc et al. 2019).  The
baseline is the same student trained on the 256 labelled texts alone for the same 400 steps.
"""
from configs import distill_two_stage as base
from configs._builders import stage


def get_config():
    config = base.get_config()
    config.student.layers = (2, 5)
    config.distill.cache_teacher_logits = True
    config.distill.labelled_examples = 256
    config.distill.stages = [stage("kd", 400, 2e-4, [dict(feature="logits", loss="kl", temperature=2.0, t2_scale=True)],
                                   hard_label_weight=0.5)]
    config.baseline.enabled = True
    return config
