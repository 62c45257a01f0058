"""Knowledge distillation: losses, declarative student <-> teacher matches, module replacing.

    from efficient_nlp import distill
    distill.soft_cross_entropy(student_logits, teacher_logits, temperature=2.0)
    matches = distill.check_matches([
        dict(feature="hidden", student_layer=1, teacher_layer=2, loss="hidden_mse"),
        dict(feature="attn_probs", student_layer=0, teacher_layer=1, loss="attention_kl"),
        dict(feature="logits", loss="kl", temperature=2.0),
    ], student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(0))
    model, _ = train.fit(model, distill.make_distill_loss(matches), batches, config=config,
                         workdir=workdir, trainable=distill.STUDENT_FILTER)

See docs/distillation.md; the recipe is `efficient_nlp.recipes.distill`.
"""
from efficient_nlp.distill.distiller import (
    STUDENT_FILTER,
    DistillStep,
    Distiller,
    cache_teacher_logits,
    feature_of,
    make_distill_loss,
    match_loss,
    student_from_teacher,
)
from efficient_nlp.distill.fidelity import (
    fidelity_metrics,
    forward_seconds,
    loyalty,
    make_fidelity_eval_fn,
    mean_kl,
    num_params,
    student_of,
)
from efficient_nlp.distill.losses import (
    attention_kl,
    attention_mse,
    cosine_embedding_loss,
    hard_label_loss,
    next_token_loss,
    next_token_targets,
    hidden_mse,
    hinton_loss,
    kl_divergence,
    logits_mse,
    masked_log_softmax,
    pkd_last_k,
    pkd_loss,
    pkd_skip,
    relation_kl,
    self_relation,
    soft_cross_entropy,
    split_relation_heads,
    value_relation_kl,
)
from efficient_nlp.distill.matches import (
    FEATURES,
    LOSSES,
    REGISTERED_LOSSES,
    Match,
    captures,
    check_matches,
    check_schedule,
    layer_matches,
    make_schedule,
    pkd_matches,
    register_loss,
    uniform_hidden_map,
)
from efficient_nlp.distill.theseus import TheseusModel, make_theseus_loss, theseus_blocks

__all__ = [
    "FEATURES", "LOSSES", "REGISTERED_LOSSES", "register_loss", "STUDENT_FILTER", "DistillStep", "Distiller", "Match", "TheseusModel",
    "attention_kl", "attention_mse", "cache_teacher_logits", "captures", "check_matches",
    "check_schedule", "cosine_embedding_loss", "feature_of", "fidelity_metrics",
    "forward_seconds", "hard_label_loss", "next_token_loss", "next_token_targets", "hidden_mse", "hinton_loss", "kl_divergence",
    "layer_matches", "logits_mse", "loyalty", "make_distill_loss", "make_fidelity_eval_fn",
    "make_schedule", "make_theseus_loss", "masked_log_softmax", "match_loss", "mean_kl",
    "num_params", "pkd_last_k", "pkd_loss", "pkd_matches", "pkd_skip", "relation_kl",
    "self_relation", "soft_cross_entropy", "split_relation_heads", "student_from_teacher",
    "student_of", "theseus_blocks", "uniform_hidden_map", "value_relation_kl",
]
