"""BERT-of-Theseus module replacing (Xu et al. 2020).

The teacher ("predecessor") is frozen; its ``L_t`` encoder layers are cut into ``L_s`` equal
blocks and student ("successor") layer ``i`` replaces block ``i`` with probability ``p(step)``
(one Bernoulli draw per block and step; ``p`` follows a schedule, linear up to 1).  There is no
distillation loss: the mixed model is trained on the task loss only, and gradients reach the
student layers through the frozen teacher blocks.  Embeddings and the classification head are
the student's own (initialised from the teacher's by `student_from_teacher`, and trained), so at
``p = 1`` the mixed model *is* the student, which is what is evaluated and exported.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp.distill import losses as L
from efficient_nlp.distill.distiller import DistillStep
from efficient_nlp.distill.matches import make_schedule
from efficient_nlp.models import family as F


def theseus_blocks(num_teacher_layers, num_student_layers):
    """``[(start, stop), ...]``: the teacher layers student layer i replaces (equal blocks)."""
    if num_student_layers < 1 or num_teacher_layers % num_student_layers:
        raise ValueError(f"BERT-of-Theseus needs the student's layer count ({num_student_layers}) "
                         f"to divide the teacher's ({num_teacher_layers})")
    k = num_teacher_layers // num_student_layers
    return tuple((i * k, (i + 1) * k) for i in range(num_student_layers))


class TheseusModel(nnx.Module):
    """student (successor) + frozen teacher (predecessor) + step counter; train with
    ``trainable=STUDENT_FILTER`` and `make_theseus_loss`."""

    def __init__(self, student, teacher):
        self.blocks = theseus_blocks(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        self.student = student
        self.teacher = teacher
        self.step = DistillStep(jnp.zeros((), jnp.int32))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, replace=None,
                 deterministic=True, rngs=None):
        """Logits of the mixed model; ``replace`` [L_s] bools (None: all student = the student)."""
        s, t = self.student, self.teacher
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        h = F.embed(s, batch, deterministic=deterministic, rngs=rngs)
        for i, (start, stop) in enumerate(self.blocks):
            hs, _ = F.run_layers(s, h, attention_mask, start=i, stop=i + 1, deterministic=deterministic, rngs=rngs)
            if replace is None:
                h = hs
                continue
            ht, _ = F.run_layers(t, h, attention_mask, start=start, stop=stop, deterministic=deterministic, rngs=rngs)
            h = jnp.where(replace[i], hs, ht)
        return F.head(s, h, deterministic=deterministic, rngs=rngs)


def make_theseus_loss(replace_rate):
    """``loss_fn(model: TheseusModel, batch, rngs)``: task loss of the mixed model.

    ``replace_rate`` is a schedule spec for p (e.g. ``dict(kind='linear', start=0.5, end=1.0,
    steps=n)``, the paper's linear curriculum ``p = min(1, k t + b)``).
    """
    rate = make_schedule(replace_rate)

    def loss_fn(model, batch, rngs):
        step = model.step[...]
        model.step[...] = step + 1
        p = rate(step)
        replace = jax.random.bernoulli(rngs.dropout(), p, (len(model.blocks),))
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       replace=replace, deterministic=False, rngs=rngs)
        loss = L.hard_label_loss(logits, batch["labels"])
        aux = {"replace_rate": p, "replaced": jnp.mean(replace.astype(jnp.float32))}
        if logits.shape[-1] > 1:
            aux["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
        return loss, aux

    return loss_fn
