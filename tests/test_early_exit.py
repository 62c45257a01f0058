"""Early exit: exit heads, training losses, exit rules, the offline simulation, the real-stopping
runner (compaction into batch buckets), saving, and composition with quantization."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from efficient_nlp import models, quant, train
from efficient_nlp.dynamic import exit_rules as R
from efficient_nlp.dynamic import exits
from efficient_nlp.dynamic.exit_runner import EarlyExitRunner
from efficient_nlp.models import family as F

import _tiny  # tests/_tiny.py

L, C, V, T = 4, 3, 50, 8


def spread(model, scales=(100.0, 40.0, 100.0)):
    """Sharpen the fresh exit heads (each by its own factor) so that their entropies differ
    between rows and overlap between exits."""
    for head, scale in zip(model.exits, scales):
        head.classifier.kernel.set_value(head.classifier.kernel.get_value() * scale)
    return model


@pytest.fixture(scope="module")
def model():
    return spread(exits.add_exits(_tiny.tiny_bert(layers=L, labels=C)))


def batch(b=7, seed=0):
    return _tiny.token_batch(b, T, V, seed=seed)


def all_logits(model, b):
    return np.asarray(exits.exit_logits(model, b))


def assert_same(decision, reference, atol=1e-6):
    np.testing.assert_array_equal(decision.exit_index, reference.exit_index)
    np.testing.assert_array_equal(decision.layers_run, reference.layers_run)
    np.testing.assert_array_equal(decision.predictions, reference.predictions)
    np.testing.assert_allclose(decision.logits, reference.logits, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- exit heads
def test_last_exit_is_exactly_the_model_and_exit_heads_use_dropout(model):
    b = batch()
    z = exits.exit_logits(model, b)
    assert z.shape == (L, 7, C) and model.exit_layers == (1, 2, 3, 4) and len(model.exits) == L - 1
    np.testing.assert_array_equal(z[-1], F.forward(model, b).logits)
    h = jnp.ones((2, T, 16))
    head = exits.ExitHead(16, C, dropout=0.5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(head(h), head(h, deterministic=True))
    assert not np.allclose(head(h, deterministic=False, rngs=nnx.Rngs(dropout=1)), head(h))
    sparse = exits.add_exits(_tiny.tiny_bert(layers=L), layers=[3, 1])
    assert sparse.exit_layers == (1, 3, 4) and exits.exit_logits(sparse, b).shape == (3, 7, 3)


FAMILIES = {"roberta": dict(model_type="roberta", pad_token_id=1, type_vocab_size=1),
            "distilbert": dict(model_type="distilbert", type_vocab_size=0),
            "electra": dict(model_type="electra", embedding_size=8)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_encoder_family_gets_exits(name):
    cfg = models.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=40, num_labels=2, **FAMILIES[name])
    model = exits.add_exits(models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0)), layers=[1, 2])
    b = batch(3)
    z = exits.exit_logits(model, b)
    assert z.shape == (3, 3, 2)
    np.testing.assert_array_equal(z[-1], F.forward(model, b).logits)
    decision = EarlyExitRunner(model, R.Entropy(0.0), max_batch=4)(b)
    np.testing.assert_allclose(decision.logits, z[-1], atol=1e-6)


def test_add_exits_refuses_what_it_cannot_serve(model):
    plain = _tiny.tiny_bert(layers=L)
    with pytest.raises(ValueError, match=r"1\.\.4.*\[0, 5\]"):
        exits.add_exits(plain, layers=[0, 2, 5])
    with pytest.raises(ValueError, match="distinct"):
        exits.add_exits(plain, layers=[2, 2])
    with pytest.raises(ValueError, match="already has exits"):
        exits.add_exits(model)
    with pytest.raises(ValueError, match="regression"):
        exits.add_exits(_tiny.tiny_bert(labels=1))
    with pytest.raises(ValueError, match="no classification head"):
        exits.add_exits(models.BertModel(plain.config, rngs=nnx.Rngs(0)))
    with pytest.raises(F.FamilyError, match="encoder"):
        exits.add_exits(_tiny.tiny_decoder())
    with pytest.raises(ValueError, match="add_exits"):
        exits.exit_logits(plain, batch())
    stripped, kept = models.named_params(exits.strip_exits(model)), models.named_params(model)
    assert not hasattr(exits.strip_exits(model), "exits") and exits.has_exits(model)
    assert set(stripped) == {k for k in kept if not k.startswith("exits.")}
    assert all(np.array_equal(v.get_value(), kept[k].get_value()) for k, v in stripped.items())


# ----------------------------------------------------------------------------- training
def test_exit_loss_pabee_weights_and_distillation():
    z = np.array([[[2.0, 0.0], [0.0, 1.0]],
                  [[1.0, 1.0], [3.0, 0.0]],
                  [[0.0, 2.0], [1.0, 2.0]]], np.float32)   # [E=3, B=2, C=2]
    y = np.array([0, 1])
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -logp[:, np.arange(2), y].mean(-1)
    loss, aux = exits.exit_loss(jnp.asarray(z), y, exit_layers=(1, 2, 3))
    np.testing.assert_allclose(loss, (1 * ce[0] + 2 * ce[1] + 3 * ce[2]) / 6, rtol=1e-6)
    assert [float(aux[f"acc_exit{k}"]) for k in (1, 2, 3)] == [1.0, 0.5, 0.5]
    sparse, _ = exits.exit_loss(jnp.asarray(z), y, exit_layers=(2, 6, 12))
    np.testing.assert_allclose(sparse, (2 * ce[0] + 6 * ce[1] + 12 * ce[2]) / 20, rtol=1e-6)
    uniform, _ = exits.exit_loss(jnp.asarray(z), y, weights="uniform")
    np.testing.assert_allclose(uniform, ce.mean(), rtol=1e-6)

    t = 2.0
    kd_loss, aux = exits.exit_loss(jnp.asarray(z), y, final_teacher=True, distill_weight=0.5, temperature=t)
    p = np.exp(z / t) / np.exp(z / t).sum(-1, keepdims=True)
    kl = (p[-1] * (np.log(p[-1]) - np.log(p[:-1]))).sum(-1).mean()
    np.testing.assert_allclose(aux["distill"], t * t * kl, rtol=1e-5)
    np.testing.assert_allclose(kd_loss, loss + 0.5 * t * t * kl, rtol=1e-5)
    same = np.broadcast_to(z[-1], z.shape)
    _, aux = exits.exit_loss(jnp.asarray(same), y, final_teacher=True)
    assert float(aux["distill"]) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="one non-negative weight per exit"):
        exits.exit_loss(jnp.asarray(z), y, weights=[1.0, 2.0])


def test_two_stage_training_changes_only_the_exits(model):
    b = {**batch(4), "labels": np.array([0, 1, 2, 0], np.int32)}
    trained, history = train.run(model, exits.make_loss(final_teacher=True), optax.sgd(0.5), [b], steps=1,
                                 trainable=exits.EXITS)
    before, after = models.named_params(model), models.named_params(trained)
    assert before.keys() == after.keys() and "acc_exit1" in history[0]
    changed = {k for k in before if not np.array_equal(before[k].get_value(), after[k].get_value())}
    assert changed and all(k.startswith("exits.") for k in changed)
    assert {k for k in before if k.startswith("exits.") and k.endswith("kernel")} <= changed
    assert exits.make_loss() == exits.make_loss() and hash(exits.make_loss(weights=[1, 2, 3, 4]))


# ----------------------------------------------------------------------------- rules
def test_entropy_and_confidence_statistics():
    z = np.array([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [1.0, 2.0, 0.5]], np.float32)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    ref = -(p * np.log(np.maximum(p, 1e-30))).sum(-1) / np.log(3)
    np.testing.assert_allclose(R.entropy(z), ref, atol=1e-6)
    assert R.entropy(z)[0] == pytest.approx(1.0) and R.entropy(z)[1] < 1e-10
    assert isinstance(R.entropy(jnp.asarray(z)), jax.Array)
    np.testing.assert_allclose(R.max_prob(z, 2.0), (np.exp(z / 2) / np.exp(z / 2).sum(-1, keepdims=True)).max(-1),
                               rtol=1e-6)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20000, 5))
    p = np.exp(z / true_t) / np.exp(z / true_t).sum(-1, keepdims=True)
    y = (p.cumsum(-1) > rng.random((len(z), 1))).argmax(-1)
    assert R.fit_temperature(z, y) == pytest.approx(true_t, rel=0.05)


def test_rules_reject_out_of_range_values():
    for bad, match in [(lambda: R.Entropy(-0.1), r">= 0"), (lambda: R.Entropy(float("nan")), r">= 0"),
                       (lambda: R.Confidence(1.5), r"\[0, 1\]"), (lambda: R.Confidence(-0.1), r"\[0, 1\]"),
                       (lambda: R.Confidence(0.5, temperatures=[1.0, 0.0]), "> 0"),
                       (lambda: R.Patience(0), ">= 1"), (lambda: R.Patience(1.5), ">= 1"),
                       (lambda: R.Patience(True), ">= 1")]:
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(ValueError, match="2 temperatures but the model has 4 exits"):
        R.simulate(np.zeros((4, 2, 3)), R.Confidence(0.5, (1.0, 2.0)), (1, 2, 3, 4))
    assert R.rule_from_dict(R.rule_to_dict(R.Confidence(0.9, [1.0, 2.0]))) == R.Confidence(0.9, (1.0, 2.0))


@pytest.mark.parametrize("rule", [R.Entropy(0.5), R.Confidence(0.6, (0.5, 1.0, 2.0, 1.0)), R.Patience(2)])
def test_decide_gives_the_same_exits_on_the_device(rule):
    z = np.random.default_rng(1).normal(size=(4, 9, C)).astype(np.float32) * 2
    state, dstate = R.init_state(rule, 9), R.init_state(rule, 9, xp=jnp)
    for e in range(4):
        exits, state = R.decide(rule, z[e], e, state, last=e == 3)
        dexits, dstate = jax.jit(lambda z, k, st: R.decide(rule, z, k, st, last=k == 3))(jnp.asarray(z[e]), e, dstate)
        np.testing.assert_array_equal(np.asarray(dexits), exits)


def test_patience_counts_consecutive_agreeing_exits():
    # predictions per exit for 3 rows: row 0: 0 0 ..., row 1: 0 1 1 1, row 2: 0 1 0 1
    preds = np.array([[0, 0, 0], [0, 1, 1], [0, 1, 0], [0, 1, 1]])
    z = np.eye(3)[preds] * 5.0
    d = R.simulate(z, R.Patience(2), (1, 2, 3, 4))
    np.testing.assert_array_equal(d.exit_index, [1, 2, 3])
    np.testing.assert_array_equal(R.simulate(z, R.Patience(3), (1, 2, 3, 4)).layers_run, [3, 4, 4])


# ----------------------------------------------------------------------------- runner vs simulation
@pytest.mark.parametrize("rule", [R.Entropy(0.0), R.Confidence(1.0), R.Patience(L + 1)], ids=str)
def test_rules_that_never_exit_give_the_full_model(model, rule):
    b = batch()
    full = np.asarray(_tiny.logits(model, b))
    for decision in (EarlyExitRunner(model, rule, max_batch=8)(b), R.simulate(all_logits(model, b), rule,
                                                                              model.exit_layers)):
        assert (decision.layers_run == L).all()
        np.testing.assert_allclose(decision.logits, full, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(decision.predictions, full.argmax(-1))


@pytest.mark.parametrize("rule", [R.Patience(1), R.Entropy(float("inf")), R.Confidence(0.0)], ids=str)
def test_rules_that_always_exit_stop_at_the_first_exit(rule):
    model = exits.add_exits(_tiny.tiny_bert(layers=L), layers=[2, 3])
    b = batch()
    first = all_logits(model, b)[0]
    for decision in (EarlyExitRunner(model, rule, max_batch=8)(b), R.simulate(all_logits(model, b), rule,
                                                                              model.exit_layers)):
        assert (decision.layers_run == 2).all() and (decision.exit_index == 0).all()
        np.testing.assert_allclose(decision.logits, first, rtol=0, atol=1e-6)


def spread_threshold(z, exit_layers, need=3):
    """An entropy threshold, away from every row's entropy, under which rows exit at the most
    different exits."""
    ent = np.sort(np.unique(R.entropy(z[:-1])))
    best = None
    for t in (ent[1:] + ent[:-1]) / 2:
        d = R.simulate(z, R.Entropy(t), exit_layers)
        key = (len(np.unique(d.exit_index)), np.abs(ent - t).min())
        best = max(best or (key, t), (key, t))
    (distinct, margin), t = best
    assert distinct >= need and margin > 1e-4
    return R.Entropy(float(t))


def test_compaction_keeps_rows_in_order_and_matches_simulate(model):
    b = batch(7)
    z = all_logits(model, b)
    for rule in (spread_threshold(z, model.exit_layers), R.Patience(2)):
        expected = R.simulate(z, rule, model.exit_layers)
        assert len(np.unique(expected.exit_index)) >= 2
        runner = EarlyExitRunner(model, rule, max_batch=8)
        host = EarlyExitRunner(model, rule, max_batch=8, device_loop=False)
        assert_same(runner(b), expected)
        assert_same(EarlyExitRunner(model, rule, max_batch=2)(b), expected)  # chunks of 2 rows
        for i in (0, 1, 6):                                   # single rows: the on-device loop and the host loop
            for r in (runner, host):
                one = r({k: v[i:i + 1] for k, v in b.items()})
                np.testing.assert_array_equal(one.layers_run, expected.layers_run[i:i + 1])
                np.testing.assert_allclose(one.logits, expected.logits[i:i + 1], rtol=0, atol=1e-5)


def test_batch_of_one_runs_only_the_layers_before_its_exit(model, monkeypatch):
    b = {k: v[:1] for k, v in batch().items()}
    rule = R.Patience(1)
    runner = EarlyExitRunner(model, rule, max_batch=4, device_loop=False)
    calls = []
    for i, segment in enumerate(runner._segments):
        monkeypatch.setattr(segment, "_fn", lambda p, x, fn=segment._fn, i=i: calls.append(i) or fn(p, x))
    assert runner(b).layers_run.tolist() == [1] and calls == [0]
    # Each segment is fed only the parameters it reads (here: one layer and one head).
    layer = len(models.named_params(F.layer_stack(model)[0]))
    assert max(len(s.params) for s in runner._segments[1:]) < 2 * layer
    runner.warmup(batch())


# ----------------------------------------------------------------------------- saving
def test_save_and_load_round_trip(model, tmp_path, caplog):
    rule = R.Confidence(0.8, temperatures=(1.0, 1.5, 2.0, 1.0))
    with caplog.at_level(logging.WARNING):
        exits.save(model, tmp_path, rule=rule)
    assert not caplog.records
    again, rule_again = exits.load(tmp_path)
    assert rule_again == rule and again.exit_layers == model.exit_layers
    b = batch()
    np.testing.assert_array_equal(exits.exit_logits(again, b), exits.exit_logits(model, b))
    record = json.loads((tmp_path / "early_exit.json").read_text())
    assert record["exit_layers"] == [1, 2, 3, 4] and record["rule"]["type"] == "confidence"

    bad = tmp_path / "bad"
    exits.save(model, bad)
    assert exits.load(bad)[1] is None
    save_file({"exits.0.dense.kernel": np.zeros((3, 3), np.float32)}, str(bad / "exits.safetensors"))
    with pytest.raises(ValueError, match=r"exits\.safetensors.*missing.*misshaped"):
        exits.load(bad)
    (bad / "exits.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"exits\.safetensors"):
        exits.load(bad)
    (tmp_path / "early_exit.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"early_exit\.json"):
        exits.load(tmp_path)


# ----------------------------------------------------------------------------- quantization
jit_exit_logits = nnx.jit(exits.exit_logits)


def test_quantized_exits_and_the_integer_model_agree():
    model = spread(exits.add_exits(_tiny.tiny_bert(layers=2)))
    qmodel, report = quant.quantize_model(model, quant.make_spec(8, 8, 8))
    assert "exits.0.dense" in report.quantized and isinstance(qmodel.exits[0].dense, quant.QuantLinear)
    imodel, _ = quant.to_integer_model(qmodel)
    b = batch(8)
    fake, integer = np.asarray(jit_exit_logits(qmodel, b)), np.asarray(jit_exit_logits(imodel, b))
    assert fake.shape == (2, 8, C)
    np.testing.assert_allclose(integer, fake, rtol=1e-4, atol=1e-5 * np.abs(fake).max())
    np.testing.assert_array_equal(integer.argmax(-1), fake.argmax(-1))
    # Per-tensor activation ranges couple the rows of a batch, so compare the runner where the
    # batch keeps its rows (no early exit, no padding).
    decision = EarlyExitRunner(imodel, R.Entropy(0.0), max_batch=8)(b)
    np.testing.assert_allclose(decision.logits, integer[-1], rtol=0, atol=1e-5 * np.abs(fake).max())


# ----------------------------------------------------------------------------- mean pooling
def test_mean_pooled_exits_read_only_real_tokens_and_survive_the_runner_and_saving(tmp_path):
    model = spread(exits.add_exits(_tiny.tiny_bert(layers=L, labels=C), pooling="mean"))
    b = batch(5)
    b["attention_mask"][:, 5:] = 0
    h = np.random.default_rng(0).normal(size=(5, T, 16)).astype(np.float32)
    np.testing.assert_allclose(exits.pool(h, b["attention_mask"], "mean"), h[:, :5].mean(1), rtol=1e-6, atol=1e-6)
    z = all_logits(model, b)
    cut = {k: v[:, :5] for k, v in b.items()}  # trailing padding removed: the same exits
    np.testing.assert_allclose(all_logits(model, cut), z, rtol=0, atol=1e-5)
    rule = spread_threshold(z, model.exit_layers, need=2)
    assert_same(EarlyExitRunner(model, rule, max_batch=4)(b), R.simulate(z, rule, model.exit_layers), atol=1e-5)
    exits.save(model, tmp_path)
    again, _ = exits.load(tmp_path)
    assert again.exits[0].pooling == "mean"
    np.testing.assert_array_equal(all_logits(again, b), z)
    with pytest.raises(ValueError, match="pooling"):
        exits.add_exits(_tiny.tiny_bert(layers=L, labels=C), pooling="max")
