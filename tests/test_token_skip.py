"""Token skipping (PoWER-BERT, LTP): exactness of full retention, soft = hard = removal on 0/1
masks, significance against NumPy, schedules, gradients of the penalties, the runner and saving."""
import json
import logging

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _tiny import logits as full_logits
from _tiny import tiny_bert, tiny_decoder, token_batch
from efficient_nlp import models
from efficient_nlp.dynamic import tokens as K
from efficient_nlp.dynamic.token_runner import TokenSkipRunner, _compact
from efficient_nlp.models import family as F

T = 16


@nnx.jit
def hard(model, batch):
    return K.hard_forward(model, batch)


@nnx.jit
def soft(model, batch):
    return K.soft_forward(model, batch)


def tiny_distilbert():
    cfg = models.BertConfig(model_type="distilbert", type_vocab_size=0, vocab_size=50, hidden_size=16,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3,
                            max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(3))


def ragged_batch(b=4, seed=0):
    """Rows of different real lengths (16, 5, 11, 3), padded on the right."""
    batch = token_batch(b, T, 50, seed=seed)
    for row, n in enumerate((16, 5, 11, 3)[:b]):
        batch["attention_mask"][row] = np.arange(T) < n
    return batch


def row(batch, i):
    return {k: v[i:i + 1] for k, v in batch.items()}


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(layers=3)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_full_retention_is_the_full_model(family, request):
    model = request.getfixturevalue("bert") if family == "bert" else tiny_distilbert()
    batch = ragged_batch()
    want = np.asarray(full_logits(model, batch))
    n = F.num_layers(model)
    real = np.repeat(batch["attention_mask"].sum(-1)[:, None], n, 1)
    power = K.add_token_skip(model, "power", max_len=T)           # r = 1: keep all
    ltp = K.set_thresholds(K.add_token_skip(model, "ltp", max_len=T), [-np.inf] * n)
    for skip in (power, ltp):
        logits, aux = soft(skip, batch)
        np.testing.assert_allclose(np.asarray(logits), want, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(aux["kept"]), 1.0)
    for skip in (K.set_counts(power, (T,) * n), ltp):
        logits, kept = hard(skip, batch)
        np.testing.assert_allclose(np.asarray(logits), want, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(kept), real)
    logits, kept = TokenSkipRunner(ltp)(batch)
    np.testing.assert_allclose(logits, want, atol=1e-5)
    np.testing.assert_array_equal(kept, real)


def test_decoder_and_bad_arguments_are_rejected(bert):
    with pytest.raises(F.FamilyError, match="encoder families only"):
        K.add_token_skip(tiny_decoder(), "power", max_len=T)
    with pytest.raises(ValueError, match="unknown token-skipping method 'drop'"):
        K.add_token_skip(bert, "drop", max_len=T)
    with pytest.raises(ValueError, match="already has a token_skip"):
        K.add_token_skip(K.add_token_skip(bert, "ltp", max_len=T), "ltp", max_len=T)
    with pytest.raises(ValueError, match="has no token_skip"):
        K.hard_forward(bert, ragged_batch())
    with pytest.raises(ValueError, match="fix_retention"):
        K.hard_forward(K.add_token_skip(bert, "power", max_len=T), ragged_batch())
    ltp = K.add_token_skip(bert, "ltp", max_len=T)
    for bad in ([0.1, np.nan, 0.1], [0.1, np.inf, 0.0]):
        with pytest.raises(ValueError, match="thresholds must be finite"):
            K.set_thresholds(ltp, bad)
    with pytest.raises(ValueError, match="set_thresholds is for method 'ltp'"):
        K.set_thresholds(K.add_token_skip(bert, "power", max_len=T), [0.0] * 3)


def test_schedules_are_validated(bert):
    power = K.add_token_skip(bert, "power", max_len=T)
    with pytest.raises(ValueError, match=r"must not increase.*layer 1 keeps 9 > 4"):
        K.set_counts(power, (4, 9, 2))
    for bad in ((0, 0, 0), (17, 5, 2)):
        with pytest.raises(ValueError, match=r"counts must be in \[1, 16\]"):
            K.set_counts(power, bad)
    with pytest.raises(ValueError, match="one count per layer"):
        K.set_counts(power, (4, 2))


def test_fix_retention_is_monotone_and_at_least_one(bert):
    r = np.zeros((3, T), np.float32)
    r[0, :5] = 1.0
    r[1, :9] = 1.0                 # learned sums 5, 9, 0.3: not monotone, last below one token
    r[2, :3] = 0.1
    r[1, 9] = 1.7                  # clipped to 1 -> sum 10
    fixed = K.fix_retention(K.add_token_skip(bert, "power", max_len=T, init=r))
    assert fixed.token_skip.counts == (5, 5, 1)


def test_first_token_is_always_kept():
    probs = np.full((2, 1, 6, 6), 0.0, np.float32)
    probs[..., 3] = 1.0                         # every query attends to token 3 only: token 0 gets nothing
    alive = jnp.ones((2, 6), bool)
    for method, setting in (("power", (1, 1)), ("ltp", [0.5, 0.5])):
        skip = K.TokenSkip(method, 2, 6)
        skip.counts = setting if method == "power" else None
        if method == "ltp":
            skip.threshold.set_value(jnp.asarray(setting, jnp.float32))
        kept = np.asarray(K.select_hard(skip, 0, probs, alive))
        want = [True, False, False, method == "ltp", False, False]   # power keeps 1: the first token
        np.testing.assert_array_equal(kept, [want, want])


def test_significance_matches_numpy():
    rng = np.random.default_rng(0)
    probs = rng.random((2, 3, 5, 5)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    w = rng.random((2, 5)).astype(np.float32)
    ref = np.zeros((2, 5))
    for b in range(2):
        for t in range(5):
            ref[b, t] = sum(w[b, q] * probs[b, h, q, t] for h in range(3) for q in range(5))
    np.testing.assert_allclose(np.asarray(K.significance(probs, w)), ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(K.significance(probs, w, normalise=True)),
                               ref / (3 * w.sum(-1, keepdims=True)), rtol=1e-6)


def test_padding_gets_zero_significance(bert):
    batch = ragged_batch()
    out = F.forward(bert, batch, capture=("attn_probs",))
    mask = batch["attention_mask"]
    for probs in out.intermediates["attn_probs"]:
        s = np.asarray(K.significance(probs, mask, normalise=True))
        assert np.all(s[mask == 0] == 0.0) and np.all(s[mask == 1] > 0.0)
        np.testing.assert_allclose(s.sum(-1), 1.0, rtol=1e-5)   # mean attention received sums to 1


def test_soft_removal_with_01_mask_is_running_on_kept_tokens_only(bert):
    batch = ragged_batch()
    h = F.embed(bert, batch)
    keep = np.ones((4, T), np.float32)
    keep[:, [2, 3, 7, 12]] = 0.0
    out, _ = F.run_layers(bert, h, batch["attention_mask"], start=0, stop=1,
                          bias=K.key_bias(batch["attention_mask"], jnp.asarray(keep)))
    kept = np.flatnonzero(keep[0])
    alone, _ = F.run_layers(bert, h[:, kept], batch["attention_mask"][:, kept], start=0, stop=1)
    live = batch["attention_mask"][:, kept] > 0
    np.testing.assert_allclose(np.asarray(out)[:, kept][live], np.asarray(alone)[live], atol=1e-5)


@pytest.mark.parametrize("method", ["power", "ltp"])
def test_runner_equals_hard_forward(bert, method):
    batch = ragged_batch()
    if method == "power":
        model = K.set_counts(K.add_token_skip(bert, "power", max_len=T), (9, 4, 2))
    else:
        model = K.set_thresholds(K.add_token_skip(bert, "ltp", max_len=T), [0.06, 0.1, 0.2])
    want, want_kept = hard(model, batch)
    runner = TokenSkipRunner(model)
    logits, kept = runner(batch)
    np.testing.assert_allclose(logits, np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(-1), np.asarray(want).argmax(-1))
    np.testing.assert_array_equal(kept, np.asarray(want_kept))
    assert kept[:, -1].min() < kept[:, 0].max()            # tokens really left
    real = batch["attention_mask"].sum(-1)
    if method == "power":                                   # absolute counts: min(real tokens, l_j)
        np.testing.assert_array_equal(kept, np.minimum(real[:, None], [9, 4, 2]))
        np.testing.assert_array_equal(K.layer_tokens(kept, batch["attention_mask"]),
                                      np.minimum(real[:, None], [T, 9, 4]))
    for i in (1, 2):                                       # batches of one row: that row's result
        one, one_kept = runner(row(batch, i))
        np.testing.assert_allclose(one, logits[i:i + 1], atol=1e-5)
        np.testing.assert_array_equal(one_kept, kept[i:i + 1])


def test_soft_power_with_01_retention_equals_hard_and_runner(bert):
    counts = (9, 4, 2)
    r = (np.arange(T)[None, :] < np.asarray(counts)[:, None]).astype(np.float32)
    model = K.set_counts(K.add_token_skip(bert, "power", max_len=T, init=r), counts)
    batch = ragged_batch()
    logits, aux = soft(model, batch)
    want, kept = hard(model, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), TokenSkipRunner(model)(batch)[0], atol=1e-5)
    real = batch["attention_mask"].sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(aux["kept"]), (np.asarray(kept) / real).mean(0), rtol=1e-6)


def test_compact_keeps_rows_and_token_order():
    hidden = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
    alive = jnp.asarray([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 1, 0]], bool)   # row 1: first position dead
    h, a = _compact(hidden, alive, 4)
    np.testing.assert_array_equal(np.asarray(h)[..., 0], [[0, 1, 3, 4], [6, 10, 7, 8]])
    np.testing.assert_array_equal(np.asarray(a), [[False, True, True, True], [True, True, False, False]])


def test_power_penalty_lowers_retention(bert):
    model = K.add_token_skip(bert, "power", max_len=T)
    batch = {**ragged_batch(), "labels": np.zeros(4, np.int32)}
    loss_fn = K.make_loss(penalty=1.0, task_weight=0.0)
    retention = nnx.All(nnx.Param, nnx.PathContains("token_skip"))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=retention)
    before = float(jnp.sum(model.token_skip.retention[...]))

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: loss_fn(m, batch, None)[0], argnums=nnx.DiffState(0, retention))(model)
        opt.update(model, grads)

    for _ in range(3):
        step(model, opt)
    after = np.asarray(model.token_skip.retention[...])
    # sgd 0.1 on an L1 of slope 1 (0.5 at the clip's corner r = 1): 0.05 + 0.1 + 0.1 per entry
    assert after.sum() < before - 0.2 * after.size and np.all(after < 1.0)


def test_make_loss_adds_the_weighted_penalty(bert):
    model = K.add_token_skip(bert, "ltp", max_len=T)
    batch = {**ragged_batch(), "labels": np.asarray([0, 1, 2, 0], np.int32)}
    loss, aux = K.make_loss(penalty=0.5)(model, batch, None)
    np.testing.assert_allclose(float(loss), float(aux["task_loss"]) + 0.5 * float(aux["penalty"]), rtol=1e-6)


def test_ltp_raising_the_threshold_lowers_the_mask(bert):
    model = K.set_thresholds(K.add_token_skip(bert, "ltp", max_len=T, temperature=1e-2), [0.07, 0.08, 0.09])
    batch = ragged_batch()
    wrt = nnx.All(nnx.Param, nnx.PathContains("token_skip"))

    @nnx.jit
    def kept(m):
        return jnp.mean(K.soft_forward(m, batch)[1]["kept"])

    grad = nnx.jit(nnx.grad(kept, argnums=nnx.DiffState(0, wrt)))(model)
    g = np.asarray(grad["token_skip"]["threshold"][...])
    assert np.all(g < 0)
    step = 1e-4
    up, down = (K.set_thresholds(model, [0.07 + d, 0.08, 0.09]) for d in (step, -step))
    fd = (float(kept(up)) - float(kept(down))) / (2 * step)
    np.testing.assert_allclose(g[0], fd, rtol=0.02)


def test_save_load_round_trip(bert, tmp_path, caplog):
    batch = ragged_batch()
    power = K.set_counts(K.add_token_skip(bert, "power", max_len=T, init=0.7), (9, 4, 2))
    ltp = K.set_thresholds(K.add_token_skip(bert, "ltp", max_len=T, temperature=2e-3), [0.06, -np.inf, 0.2])
    for name, model in (("power", power), ("ltp", ltp)):
        with caplog.at_level(logging.WARNING):
            K.save(model, tmp_path / name)
        assert not caplog.records
        again = K.load(tmp_path / name)
        assert again.token_skip.counts == model.token_skip.counts
        assert again.token_skip.temperature == model.token_skip.temperature
        np.testing.assert_array_equal(np.asarray(again.token_skip.params()), np.asarray(model.token_skip.params()))
        for a, b in zip(hard(again, batch), hard(model, batch)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_reports_corrupt_and_missing_files(bert, tmp_path):
    K.save(K.add_token_skip(bert, "ltp", max_len=T), tmp_path)
    record = tmp_path / K.RECORD_NAME
    good = record.read_text()
    record.write_text(good[:20])
    with pytest.raises(ValueError, match="token_skip.json is not valid JSON"):
        K.load(tmp_path)
    record.write_text(json.dumps({**json.loads(good), "num_layers": 5}))
    with pytest.raises(ValueError, match="the checkpoint has 3 layers"):
        K.load(tmp_path)
    record.write_text(good)
    (tmp_path / K.STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no token_skip.safetensors"):
        K.load(tmp_path)
    record.unlink()
    with pytest.raises(FileNotFoundError, match="no token_skip.json"):
        K.load(tmp_path)


def test_weight_quantized_and_integer_models_skip_tokens_like_the_fake_quant_model(bert):
    """W8 weights (activations float: no batch- or length-dependent ranges): the int8 model's runner
    equals its fixed-shape reference and keeps the fake-quant model's tokens and predictions."""
    from efficient_nlp import quant

    batch = ragged_batch()
    model = K.set_thresholds(K.add_token_skip(bert, "ltp", max_len=T), [0.06, 0.1, 0.2])
    qmodel, report = quant.quantize_model(model, quant.make_spec(8, 8, 32))
    assert report.quantized and not any("token_skip" in s for s in report.quantized)
    imodel, _ = quant.to_integer_model(qmodel)
    fake, fake_kept = hard(qmodel, batch)
    logits, kept = TokenSkipRunner(imodel)(batch)
    ref, ref_kept = hard(imodel, batch)
    np.testing.assert_allclose(logits, np.asarray(ref), atol=1e-5)
    np.testing.assert_array_equal(kept, np.asarray(ref_kept))
    np.testing.assert_array_equal(kept, np.asarray(fake_kept))
    np.testing.assert_allclose(logits, np.asarray(fake), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(fake)).max())
