"""Each distillation loss against a direct NumPy formula; gradients; masks; head permutations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_nlp import distill

RNG = np.random.default_rng(0)


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def logits(*shape):
    return RNG.normal(size=shape).astype(np.float32) * 2


def padding_mask(b=3, t=6):
    mask = np.ones((b, t), np.float32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_cross_entropy_and_kl_match_numpy(temperature):
    s, t = logits(4, 5, 7), logits(4, 5, 7)
    p_t = np_softmax(t / temperature)
    ce = np.mean(-(p_t * np_log_softmax(s / temperature)).sum(-1))
    kl = np.mean((p_t * (np.log(p_t) - np_log_softmax(s / temperature))).sum(-1))
    np.testing.assert_allclose(distill.soft_cross_entropy(s, t, temperature), ce, rtol=1e-5)
    np.testing.assert_allclose(distill.kl_divergence(s, t, temperature), kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distill.soft_cross_entropy(s, t, temperature, t2_scale=True),
                               ce * temperature ** 2, rtol=1e-5)
    np.testing.assert_allclose(distill.kl_divergence(t, t, temperature), 0.0, atol=1e-6)


def test_logits_mse_and_hinton_mix():
    s, t = logits(8, 3), logits(8, 3)
    y = RNG.integers(0, 3, 8)
    np.testing.assert_allclose(distill.logits_mse(s, t), np.mean((s - t) ** 2), rtol=1e-6)
    hard = -np.mean(np_log_softmax(s)[np.arange(8), y])
    soft = np.mean(-(np_softmax(t / 2) * np_log_softmax(s / 2)).sum(-1)) * 4
    np.testing.assert_allclose(distill.hard_label_loss(s, y), hard, rtol=1e-6)
    np.testing.assert_allclose(distill.hinton_loss(s, t, y, temperature=2.0, hard_weight=0.3),
                               0.3 * hard + 0.7 * soft, rtol=1e-5)


def test_hard_label_loss_weights_count_only_the_labelled_rows():
    s, y = logits(8, 3), RNG.integers(0, 3, 8)
    w = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
    ce = -np_log_softmax(s)[np.arange(8), y]
    np.testing.assert_allclose(distill.hard_label_loss(s, y, w), ce[w > 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(distill.hard_label_loss(s, y, np.ones(8)), distill.hard_label_loss(s, y), rtol=1e-6)
    assert float(distill.hard_label_loss(s, y, np.zeros(8))) == 0.0   # a batch with no labelled row
    r = RNG.normal(size=(8, 1)).astype(np.float32)                     # regression: weighted MSE
    target = RNG.normal(size=8).astype(np.float32)
    np.testing.assert_allclose(distill.hard_label_loss(r, target, w),
                               ((r[:, 0] - target) ** 2)[w > 0].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- hidden states
def test_hidden_mse_with_projection_and_mask():
    s, t, mask = logits(3, 6, 4), logits(3, 6, 8), padding_mask()
    w, b = logits(4, 8), logits(8)
    sq = (((s @ w + b) - t) ** 2).mean(-1)
    expected = (sq * mask).sum() / mask.sum()
    np.testing.assert_allclose(distill.hidden_mse(s, t, mask, kernel=w, bias=b), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="projection"):
        distill.hidden_mse(s, t, mask)


def test_cosine_and_pkd_match_numpy():
    s, t, mask = logits(3, 6, 8), logits(3, 6, 8), padding_mask()
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    np.testing.assert_allclose(distill.cosine_embedding_loss(s, t, mask),
                               ((1 - cos) * mask).sum() / mask.sum(), rtol=1e-5)
    sc = s[:, 0] / np.linalg.norm(s[:, 0], axis=-1, keepdims=True)
    tc = t[:, 0] / np.linalg.norm(t[:, 0], axis=-1, keepdims=True)
    np.testing.assert_allclose(distill.pkd_loss(s, t), ((sc - tc) ** 2).sum(-1).mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- attention
def np_attention_kl(s_scores, t_scores, mask):
    bias = np.where(mask > 0, 0.0, -1e9)[:, None, None, :]
    log_s, log_t = np_log_softmax(s_scores + bias), np_log_softmax(t_scores + bias)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)          # [B,N,T]
    w = np.broadcast_to(mask[:, None, :], kl.shape)
    return (kl * w).sum() / w.sum()


def test_attention_losses_match_numpy_and_exclude_padding():
    s, t, mask = logits(3, 2, 6, 6), logits(3, 2, 6, 6), padding_mask()
    pair = mask[:, None, :, None] * mask[:, None, None, :]
    np.testing.assert_allclose(distill.attention_mse(s, t, mask),
                               ((s - t) ** 2 * pair).sum() / np.broadcast_to(pair, s.shape).sum(), rtol=1e-5)
    expected = np_attention_kl(s, t, mask)
    np.testing.assert_allclose(distill.attention_kl(s, t, mask, from_scores=True), expected, rtol=1e-4)
    # From probabilities as the model gives them (padded keys ~0): the same value.
    bias = np.where(mask > 0, 0.0, -1e9)[:, None, None, :]
    ps, pt = np_softmax(s + bias), np_softmax(t + bias)
    np.testing.assert_allclose(distill.attention_kl(ps, pt, mask), expected, rtol=1e-4)
    # Garbage at padded positions (keys and queries) changes nothing.
    s2, t2 = s.copy(), t.copy()
    pad = pair == 0
    s2[np.broadcast_to(pad, s.shape)] = 1e3
    t2[np.broadcast_to(pad, t.shape)] = -1e3
    for fn in (distill.attention_mse, lambda a, b, m: distill.attention_kl(a, b, m, from_scores=True)):
        np.testing.assert_allclose(fn(s2, t2, mask), fn(s, t, mask), rtol=1e-5)


def np_relation(x, mask):
    d = x.shape[-1]
    return np_log_softmax(x @ np.swapaxes(x, -1, -2) / np.sqrt(d) + np.where(mask > 0, 0, -1e9)[:, None, None, :])


def test_value_relation_and_multihead_relation_match_numpy():
    mask = padding_mask()
    vs, vt = logits(3, 2, 6, 4), logits(3, 2, 6, 8)   # same heads, different head widths
    ls, lt = np_relation(vs, mask), np_relation(vt, mask)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    w = np.broadcast_to(mask[:, None, :], kl.shape)
    np.testing.assert_allclose(distill.value_relation_kl(vs, vt, mask), (kl * w).sum() / w.sum(), rtol=1e-4)
    # MiniLMv2: concatenate heads (width 8 vs 16), re-split into R=4 relation heads.
    cat_s = vs.transpose(0, 2, 1, 3).reshape(3, 6, 8)
    cat_t = vt.transpose(0, 2, 1, 3).reshape(3, 6, 16)
    rs = cat_s.reshape(3, 6, 4, 2).transpose(0, 2, 1, 3)
    rt = cat_t.reshape(3, 6, 4, 4).transpose(0, 2, 1, 3)
    ls, lt = np_relation(rs, mask), np_relation(rt, mask)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    w = np.broadcast_to(mask[:, None, :], kl.shape)
    np.testing.assert_allclose(distill.relation_kl(vs, vt, mask, num_relation_heads=4),
                               (kl * w).sum() / w.sum(), rtol=1e-4)


def test_relations_under_head_permutation():
    mask = padding_mask()
    qs, qt = logits(3, 4, 6, 2), logits(3, 4, 6, 4)
    perm = np.array([2, 0, 3, 1])
    # Per-head losses: invariant when both sides permute their heads together ...
    for fn in (distill.value_relation_kl,
               lambda a, b, m: distill.relation_kl(a, b, m, num_relation_heads=4)):
        np.testing.assert_allclose(fn(qs[:, perm], qt[:, perm], mask), fn(qs, qt, mask), rtol=1e-5)
    # ... one relation head over all attention heads: invariant to the student's order alone,
    assert float(distill.relation_kl(qs[:, perm], qt, mask, num_relation_heads=1)) == pytest.approx(
        float(distill.relation_kl(qs, qt, mask, num_relation_heads=1)), rel=1e-5)
    # ... while per-head matching is not (the heads are compared one to one).
    assert abs(float(distill.value_relation_kl(qs[:, perm], qt, mask))
               - float(distill.value_relation_kl(qs, qt, mask))) > 1e-4


def test_gradients_are_finite_even_with_fully_padded_rows():
    mask = padding_mask()
    mask[2] = 0  # a row with no tokens at all
    s4, t4 = logits(3, 2, 6, 6), logits(3, 2, 6, 6)
    h_s, h_t = logits(3, 6, 8), logits(3, 6, 8)
    fns = [
        lambda x: distill.attention_kl(x, t4, mask, from_scores=True),
        lambda x: distill.attention_kl(jax.nn.softmax(x), jax.nn.softmax(t4), mask),
        lambda x: distill.attention_mse(x, t4, mask),
        lambda x: distill.relation_kl(x, t4, mask, num_relation_heads=2),
        lambda x: distill.value_relation_kl(x, t4, mask),
        lambda x: distill.kl_divergence(x, t4, 2.0),
    ]
    for fn in fns:
        g = jax.jit(jax.grad(fn))(jnp.asarray(s4))
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    for fn in (distill.hidden_mse, distill.cosine_embedding_loss, distill.pkd_loss):
        g = jax.jit(jax.grad(lambda x: fn(x, h_t, mask)))(jnp.asarray(h_s))
        assert np.all(np.isfinite(g))
        if fn is not distill.pkd_loss:
            assert np.all(g[2] == 0)  # padding gets no gradient


def test_pkd_layer_maps():
    assert distill.pkd_skip(12, 6) == (1, 3, 5, 7, 9, 11)
    assert distill.pkd_last_k(12, 6) == (6, 7, 8, 9, 10, 11)
    assert distill.pkd_skip(6, 3) == (1, 3, 5)
    with pytest.raises(ValueError):
        distill.pkd_skip(3, 6)
