"""One-stage distillation: intermediate and prediction-layer matches together, plus hard labels.

    python train.py --config configs/distill_one_stage.py --workdir runs/distill_one

Same teacher and 3-layer student as ``configs/distill_two_stage.py``; one run of 400 steps with
hidden-state MSE, attention-score MSE and KL on the logits at T=2 (times T^2), mixed with the
hard-label loss (weight 0.5).
"""
from configs import distill_two_stage as base
from configs._builders import stage


def get_config():
    config = base.get_config()
    matches = base.intermediate_matches() + [
        dict(feature="logits", loss="kl", temperature=2.0, t2_scale=True)]
    config.distill.stages = [stage("all", 400, 1e-4, matches, hard_label_weight=0.5)]
    return config
