"""Distillation reads the model family: on BERT it gives exactly what the BERT-only code gave
(layer-mapped copy, query / key features, Theseus forward), and it runs on RoBERTa / DistilBERT."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import distill, models
from efficient_nlp.models import family as F

BERT = models.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=32, num_labels=3)
FAMILIES = {
    "roberta": BERT.replace(model_type="roberta", pad_token_id=1, max_position_embeddings=40, type_vocab_size=1),
    "distilbert": BERT.replace(model_type="distilbert", type_vocab_size=0),
}


def batch(b=4, t=10, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[1, 6:] = 0
    return dict(input_ids=rng.integers(2, 60, (b, t)).astype(np.int32), attention_mask=mask,
                token_type_ids=np.zeros((b, t), np.int32), labels=rng.integers(0, 3, b).astype(np.int32))


def _args(b):
    return b["input_ids"], b["attention_mask"], b["token_type_ids"]


def test_student_from_teacher_copies_what_the_bert_path_regex_copied():
    teacher = models.BertForSequenceClassification(BERT, rngs=nnx.Rngs(0))
    layers = (3, 0)
    student = distill.student_from_teacher(teacher, layers, hidden_dropout_prob=0.0)
    assert student.config == BERT.replace(num_hidden_layers=2, hidden_dropout_prob=0.0)
    t, s = models.named_params(teacher), models.named_params(student)
    for path, var in s.items():   # the former copy, spelled out for BERT
        m = re.match(r"bert\.encoder\.layers\.(\d+)\.(.*)", path)
        src = f"bert.encoder.layers.{layers[int(m.group(1))]}.{m.group(2)}" if m else path
        np.testing.assert_array_equal(var.get_value(), t[src].get_value())


def test_query_and_key_features_are_the_bert_projections():
    model = models.BertForSequenceClassification(BERT, rngs=nnx.Rngs(0))
    out = model(*_args(batch()), capture=("hidden_states",))
    attention = model.bert.encoder.layers[2].attention
    for feature, dense in (("queries", attention.query), ("keys", attention.key)):
        x = dense(out.intermediates["hidden_states"][2])
        want = x.reshape(*x.shape[:2], 2, 8).transpose(0, 2, 1, 3)
        np.testing.assert_array_equal(distill.feature_of(model, out, feature, 2), want)


def test_theseus_forward_is_the_bert_forward_with_dropout():
    teacher = models.BertForSequenceClassification(BERT, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (0, 2))
    model = distill.TheseusModel(student, teacher)
    ids, mask, types = _args(batch())
    replace = jnp.asarray([True, False])

    def former(s, t):   # the BERT-only forward this replaces
        rngs = nnx.Rngs(dropout=7)
        h = s.bert.embeddings(ids, types, deterministic=False, rngs=rngs)
        for i, (start, stop) in enumerate(model.blocks):
            hs, _ = s.bert.encoder(h, mask, start=i, stop=i + 1, deterministic=False, rngs=rngs)
            ht, _ = t.bert.encoder(h, mask, start=start, stop=stop, deterministic=False, rngs=rngs)
            h = jnp.where(replace[i], hs, ht)
        return s.classifier(s.dropout(s.bert.pooler(h), deterministic=False, rngs=rngs))

    got = model(ids, mask, types, replace=replace, deterministic=False, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(got, former(student, teacher))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_distiller_and_theseus_on_other_families(family):
    teacher = models.BertForSequenceClassification(FAMILIES[family], rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (1, 3))
    np.testing.assert_array_equal(F.get_module(student, F.site_path(student, 1, "ffn_out")).kernel[...],
                                  F.get_module(teacher, F.site_path(teacher, 3, "ffn_out")).kernel[...])
    for path in (F.embeddings_path(student), *F.head_paths(student)):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(F.get_module(student, path), nnx.Param),
                     nnx.state(F.get_module(teacher, path), nnx.Param))
    b = batch()
    matches = distill.check_matches([
        dict(feature="hidden", student_layer=2, teacher_layer=4, loss="hidden_mse"),
        dict(feature="queries", student_layer=1, teacher_layer=3, loss="relation_kl"),
        dict(feature="keys", student_layer=0, teacher_layer=1, loss="relation_kl"),
        dict(feature="attn_probs", student_layer=0, teacher_layer=1, loss="attention_kl"),
        dict(feature="logits", loss="kl", temperature=2.0)], student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(1))
    loss_fn = distill.make_distill_loss(matches, hard_label_weight=0.5)
    loss, grads = nnx.jit(lambda m: nnx.value_and_grad(
        lambda m: loss_fn(m, b, nnx.Rngs(dropout=0))[0])(m))(model)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))

    theseus = distill.TheseusModel(student, teacher)
    args = _args(b)
    np.testing.assert_allclose(theseus(*args, replace=np.array([False, False])), teacher(*args).logits, atol=1e-5)
    np.testing.assert_allclose(theseus(*args), student(*args).logits, atol=1e-5)
