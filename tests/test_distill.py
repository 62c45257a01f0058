"""Matches (config round trip, config-time errors), schedules, the Distiller step, Theseus."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import distill, models, train

TEACHER = models.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=3)
STUDENT = TEACHER.replace(num_hidden_layers=2)


def batch(b=8, t=10, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return dict(input_ids=rng.integers(1, 100, (b, t)).astype(np.int32), attention_mask=mask,
                token_type_ids=np.zeros((b, t), np.int32), labels=rng.integers(0, 3, b).astype(np.int32))


MATCHES = [
    dict(feature="embedding", loss="hidden_mse"),
    dict(feature="hidden", student_layer=2, teacher_layer=-1, loss="cosine"),
    dict(feature="attn_scores", student_layer=1, teacher_layer=3, loss="attention_mse"),
    dict(feature="attn_probs", student_layer=0, teacher_layer=1, loss="attention_kl"),
    dict(feature="values", student_layer=1, teacher_layer=3, loss="value_relation_kl"),
    dict(feature="queries", student_layer=1, teacher_layer=3, loss="relation_kl", relation_heads=4),
    dict(feature="keys", student_layer=1, teacher_layer=3, loss="relation_kl", relation_heads=1),
    dict(feature="ffn_out", student_layer=0, teacher_layer=1, loss="hidden_mse", projection=True,
         weight=dict(kind="linear", start=1.0, end=0.0, steps=4)),
    dict(feature="mha_out", student_layer=0, teacher_layer=1, loss="pkd"),
    dict(feature="logits", loss="kl", temperature=dict(kind="piecewise", boundaries=[2], values=[4.0, 1.0]),
         t2_scale=True),
]


def test_match_config_round_trip():
    checked = distill.check_matches(MATCHES, STUDENT, TEACHER)
    assert checked[1].teacher_layer == 4  # negative index resolved (hidden states 0..4)
    config = ml_collections.ConfigDict(dict(matches=[m.to_dict() for m in checked]))
    again = distill.check_matches(ml_collections.ConfigDict(config.to_dict()).matches, STUDENT, TEACHER)
    assert again == checked
    assert [distill.Match.from_dict(m.to_dict()) for m in checked] == list(checked)
    assert distill.uniform_hidden_map(6, 3) == ((0, 0), (1, 2), (2, 4), (3, 6))
    pkd = distill.check_matches(distill.pkd_matches(6, 3), STUDENT.replace(num_hidden_layers=3),
                                TEACHER.replace(num_hidden_layers=6))
    assert [(m.student_layer, m.teacher_layer) for m in pkd] == [(1, 2), (2, 4)]


@pytest.mark.parametrize("bad, message", [
    (dict(feature="hidden", student_layer=3, teacher_layer=0, loss="hidden_mse"),
     r"student_layer=3 is out of range .* 0\.\.2"),
    (dict(feature="attn_probs", student_layer=0, teacher_layer=4, loss="attention_kl"),
     r"teacher_layer=4 is out of range .* 0\.\.3"),
    (dict(feature="hiden", student_layer=0, teacher_layer=0, loss="hidden_mse"), "unknown feature 'hiden'"),
    (dict(feature="hidden", student_layer=0, teacher_layer=0, loss="l2"), "unknown loss 'l2'"),
    (dict(feature="logits", loss="hidden_mse"), "takes features"),
    (dict(feature="logits", loss="kl", student_layer=2), "takes no student_layer"),
    (dict(feature="hidden", student_layer=0, teacher_layer=0, loss="hidden_mse", weight="big"), "not a schedule"),
    (dict(feature="logits", loss="kl", temperature=dict(kind="cosine")), "unknown schedule kind"),
    (dict(feature="hidden", student_layer=0, teacher_layer=0, loss="mse"), "unknown loss"),
    (dict(feature="values", student_layer=0, teacher_layer=0, loss="relation_kl", relation_heads=3),
     "relation_heads=3 must divide"),
    (dict(feature="hidden", student_layer=0, teacher_layer=0, loss="hidden_mse", layer_T=0), "unknown match key"),
])
def test_bad_matches_fail_at_config_time(bad, message):
    with pytest.raises(ValueError, match=message):
        distill.check_matches([bad], STUDENT, TEACHER)


def test_width_and_head_mismatches_need_projection_or_relations():
    narrow = STUDENT.replace(hidden_size=8, intermediate_size=16, num_attention_heads=1)
    with pytest.raises(ValueError, match="set projection=True"):
        distill.check_matches([dict(feature="hidden", student_layer=1, teacher_layer=2, loss="hidden_mse")],
                              narrow, TEACHER)
    with pytest.raises(ValueError, match="use relation_kl"):
        distill.check_matches([dict(feature="attn_probs", student_layer=0, teacher_layer=1,
                                    loss="attention_kl")], narrow, TEACHER)
    distill.check_matches([dict(feature="hidden", student_layer=1, teacher_layer=2, loss="hidden_mse",
                                projection=True),
                           dict(feature="values", student_layer=0, teacher_layer=1, loss="relation_kl",
                                relation_heads=2)], narrow, TEACHER)


def test_schedules():
    lin = distill.make_schedule(dict(kind="linear", start=4.0, end=1.0, steps=3, begin=1))
    assert [float(lin(s)) for s in range(6)] == [4.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    pw = distill.make_schedule(ml_collections.ConfigDict(dict(kind="piecewise", boundaries=[2, 4],
                                                              values=[1.0, 0.5, 0.0])))
    assert [float(pw(s)) for s in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert float(jax.jit(distill.make_schedule(0.25))(3)) == 0.25


def test_student_from_teacher_copies_chosen_layers():
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (1, 3), hidden_dropout_prob=0.0)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_dropout_prob == 0.0
    t, s = models.named_params(teacher), models.named_params(student)
    for name in ("bert.encoder.layers.1.ffn.output.kernel", "bert.encoder.layers.3.attention.query.bias"):
        mapped = name.replace("layers.1.", "layers.0.").replace("layers.3.", "layers.1.")
        np.testing.assert_array_equal(s[mapped].get_value(), t[name].get_value())
    np.testing.assert_array_equal(s["classifier.kernel"].get_value(), t["classifier.kernel"].get_value())
    with pytest.raises(ValueError, match="distinct teacher layer indices in 0..3"):
        distill.student_from_teacher(teacher, (0, 4))


def test_every_feature_and_loss_through_the_distiller():
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (0, 2))
    matches = distill.check_matches(MATCHES, student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(1))
    loss_fn = distill.make_distill_loss(matches, hard_label_weight=0.5)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, b):
        m = nnx.merge(graphdef, state)
        return loss_fn(m, b, nnx.Rngs(dropout=0))

    loss, aux = run(state, batch())
    assert np.isfinite(loss)
    assert {k for k in aux if k.startswith("distill/")} == {f"distill/{m.label}" for m in matches}
    assert all(np.isfinite(v) for v in aux.values())


def test_distill_fit_trains_student_only(tmp_path):
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (0, 2))
    matches = distill.check_matches([MATCHES[3], MATCHES[7], MATCHES[9]], student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(1))
    loss_fn = distill.make_distill_loss(matches, hard_label_weight=0.5)
    teacher_before = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
    student_before = jax.tree.map(np.array, nnx.state(student, nnx.Param))
    proj_before = np.array(model.projections[0].kernel.get_value())
    b = batch()
    config = ml_collections.ConfigDict(dict(train=dict(
        num_steps=2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, log_every=1,
        checkpoint_every=0, async_checkpointing=False, tensorboard=False, progress_bar=False)))
    trained, history = train.fit(model, loss_fn, lambda start: iter([b] * 8), config=config,
                                 workdir=str(tmp_path), trainable=distill.STUDENT_FILTER)
    losses = [r for r in history if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in losses)
    assert int(trained.step[...]) == 2
    jax.tree.map(np.testing.assert_array_equal, teacher_before,
                 jax.tree.map(np.array, nnx.state(trained.teacher, nnx.Param)))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), student_before,
                                           jax.tree.map(np.array, nnx.state(trained.student, nnx.Param))))
    assert all(changed)
    assert np.any(np.array(trained.projections[0].kernel.get_value()) != proj_before)
    for r in losses:
        assert set(k for k in r if k.startswith("distill/")) == {f"distill/{m.label}" for m in matches}


def test_unlabelled_rows_of_a_transfer_set_contribute_only_through_the_teacher():
    """``label_weights`` 0 (transfer-set rows): their labels change neither the loss nor the
    student's gradients; a labelled row's label does."""
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (0, 2))
    matches = distill.check_matches([dict(feature="logits", loss="kl", temperature=2.0)], student.config,
                                    teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(1))
    loss_fn = distill.make_distill_loss(matches, hard_label_weight=0.5)

    @nnx.jit
    def loss_and_grads(model, b):   # the schedules are constant: the step counter changes nothing
        return nnx.value_and_grad(lambda m: loss_fn(m, b, nnx.Rngs(dropout=0))[0])(model)

    b = {**batch(), "label_weights": np.array([1, 0, 1, 0, 0, 1, 0, 0], np.float32)}
    relabelled = dict(b, labels=np.where(b["label_weights"] > 0, b["labels"], (b["labels"] + 1) % 3))
    changed = dict(b, labels=np.where(np.arange(8) == 0, (b["labels"] + 1) % 3, b["labels"]))
    (l0, g0), (l1, g1), (l2, _) = (loss_and_grads(model, x) for x in (b, relabelled, changed))
    assert float(l0) == float(l1) and float(l2) != float(l0)
    jax.tree.map(np.testing.assert_array_equal, g0, g1)


def test_cached_teacher_logits_give_the_same_loss(tmp_path):
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (1, 3))
    matches = distill.check_matches([dict(feature="logits", loss="soft_ce", temperature=2.0)],
                                    student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(0))
    b = batch(b=16)
    path = str(tmp_path / "cache.npz")
    cached = distill.cache_teacher_logits(teacher, b, 8, path)
    again = distill.cache_teacher_logits(None, b, 8, path)  # read back, no teacher needed
    np.testing.assert_array_equal(cached, again)
    loss_fn = jax.jit(lambda m, x: distill.make_distill_loss(matches)(m, x, nnx.Rngs(dropout=0))[0])
    online = loss_fn(model, b)
    offline = loss_fn(model, {**b, "teacher_logits": cached})
    np.testing.assert_allclose(offline, online, rtol=1e-5)


def test_fidelity_metrics():
    t = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    s = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    assert distill.loyalty(s, t) == pytest.approx(2 / 3)
    assert distill.mean_kl(t, t) == pytest.approx(0.0, abs=1e-6)
    assert distill.mean_kl(s, t) > 0


def test_theseus_replaces_blocks_and_freezes_teacher():
    teacher = models.BertForSequenceClassification(TEACHER, rngs=nnx.Rngs(0))
    student = distill.student_from_teacher(teacher, (0, 2))
    model = distill.TheseusModel(student, teacher)
    assert model.blocks == ((0, 2), (2, 4))
    b = batch()
    args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
    np.testing.assert_allclose(model(*args, replace=np.array([False, False])), teacher(*args).logits, atol=1e-5)
    np.testing.assert_allclose(model(*args, replace=np.array([True, True])), student(*args).logits, atol=1e-5)
    loss_fn = distill.make_theseus_loss(dict(kind="linear", start=0.5, end=1.0, steps=10))
    params = nnx.state(model, distill.STUDENT_FILTER)
    graphdef, trainable, rest = nnx.split(model, distill.STUDENT_FILTER, ...)

    def loss(p):  # fresh non-trainable Variables at this trace level, as train_step does
        return loss_fn(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)), b, nnx.Rngs(dropout=1))[0]
    grads = jax.jit(jax.grad(loss))(trainable)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert not any("teacher" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    with pytest.raises(ValueError, match="divide"):
        distill.theseus_blocks(4, 3)
