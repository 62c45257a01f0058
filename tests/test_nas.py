"""APS (docs/nas.md): shared layers, sharing level, annealing, controller, beam search, FLOPs."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import nas
from efficient_nlp.nas import aps, controller as ctrl_lib, flops as flops_lib, sharing, spaces


def _unit_columns(rng, c, widths):
    return [jnp.asarray(_normalize(rng.normal(size=(c, w)))) for w in widths]


def _normalize(a):
    return a / np.linalg.norm(a, axis=0, keepdims=True)


def _semi_orthogonal(rng, c, widths):
    return [jnp.asarray(np.linalg.qr(rng.normal(size=(c, w)))[0]) for w in widths]


# ------------------------------------------------------------------ layers
@pytest.mark.parametrize("conv", [False, True])
def test_candidate_kernels_equal_the_ordinal_slice(conv):
    rngs = nnx.Rngs(0)
    if conv:
        layer = aps.ApsConv(8, 6, 3, in_widths=(2, 5, 8), out_widths=(3, 6), use_bias=True,
                            rngs=rngs)
    else:
        layer = aps.ApsDense(8, 6, in_widths=(2, 5, 8), out_widths=(3, 6), rngs=rngs)
    layer.bias.set_value(jnp.arange(6.0))
    w = np.asarray(layer.kernel[...])
    for i, ci in enumerate((2, 5, 8)):
        for o, co in enumerate((3, 6)):
            np.testing.assert_allclose(layer.candidate_kernel(i, o), w[..., :ci, :co], atol=0)
            padded, b = layer.candidate(i, o)
            np.testing.assert_allclose(padded[..., :ci, :co], w[..., :ci, :co], atol=0)
            assert not np.any(np.asarray(padded)[..., ci:, :]) and not np.any(np.asarray(padded)[..., co:])
            np.testing.assert_allclose(b, np.where(np.arange(6) < co, np.arange(6.0), 0))


def test_dense_forward_equals_sliced_matmul_and_padding_is_zero():
    layer = aps.ApsDense(8, 6, in_widths=(4, 8), out_widths=(3, 6), rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    x[:, 4:] = 0.0  # an input of width 4 in the padded layout
    y = np.asarray(layer(jnp.asarray(x), 0, 0))
    w = np.asarray(layer.kernel[...])
    np.testing.assert_allclose(y[:, :3], x[:, :4] @ w[:4, :3], rtol=1e-5, atol=1e-6)
    assert not np.any(y[:, 3:])


def test_p_and_q_get_no_gradient_from_the_task_loss():
    model = spaces.ApsResNet(spaces.cnn_decisions(1)[1], blocks_per_stage=1,
                             sharing="independent", rngs=nnx.Rngs(0))
    graphdef, params, transforms, rest = nnx.split(model, nnx.Param, aps.Transform, ...)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
    arch = jnp.asarray([1, 2, 3, 0, 1, 2, 3, 3, 1])

    def loss(params, transforms):
        return jnp.sum(nnx.merge(graphdef, params, transforms, rest)(x, arch) ** 2)

    gp, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, transforms)
    assert len(jax.tree.leaves(gt)) > 0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(gt))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(gp))
    # and the split the training step uses never puts P/Q among the trainable parameters
    assert not any(isinstance(v, aps.Transform) for _, v in nnx.iter_graph(params))


def test_independent_init_is_disjoint_when_widths_allow():
    t = aps.independent_transforms(10, (2, 3, 5))
    rows = [set(np.flatnonzero(t[a].any(1))) for a in range(3)]
    assert all(not (rows[a] & rows[b]) for a, b in itertools.combinations(range(3), 2))
    np.testing.assert_allclose(np.linalg.norm(t[2][:, :5], axis=0), 1.0)


# ------------------------------------------------------------------ sharing level
def _brute_force_phi(Ps, Qs):
    """Sum over candidate pairs of ||Cov(vec W^{i,o}, vec W^{i~,o~})||_F^2 for W with i.i.d.
    N(0, 1) entries, built from the explicit linear maps vec(W) -> vec(W^{i,o})."""
    c_in, c_out = Qs[0].shape[0], Ps[0].shape[0]
    basis = np.eye(c_in * c_out).reshape(-1, c_in, c_out)

    def linear_map(q, p):  # rows: vec(W^{i,o}) for every basis W
        return np.stack([(np.asarray(q).T @ e @ np.asarray(p)).ravel() for e in basis], 1)

    total = 0.0
    for i, it in itertools.combinations_with_replacement(range(len(Qs)), 2):
        for o, ot in itertools.combinations_with_replacement(range(len(Ps)), 2):
            cov = linear_map(Qs[i], Ps[o]) @ linear_map(Qs[it], Ps[ot]).T
            total += np.sum(cov ** 2)
    return total


def test_phi_closed_form_equals_brute_force_covariance():
    rng = np.random.default_rng(0)
    Ps, Qs = _unit_columns(rng, 4, (1, 2, 4)), _unit_columns(rng, 3, (2, 3))
    np.testing.assert_allclose(nas.sharing_level(Ps, Qs), _brute_force_phi(Ps, Qs), rtol=1e-5)
    # Monte Carlo estimate of one covariance block agrees too
    w = rng.normal(size=(20000, 3, 4))
    a = np.einsum("ia,nio,ob->nab", Qs[0], w, Ps[1]).reshape(len(w), -1)
    b = np.einsum("ia,nio,ob->nab", Qs[1], w, Ps[2]).reshape(len(w), -1)
    mc = np.sum((a.T @ b / len(w)) ** 2)
    exact = float(sharing.pair_sum([Qs[0], Qs[1]]) - sharing.pair_sum([Qs[0]]) - sharing.pair_sum([Qs[1]])) * \
        float(sharing.pair_sum([Ps[1], Ps[2]]) - sharing.pair_sum([Ps[1]]) - sharing.pair_sum([Ps[2]]))
    assert mc == pytest.approx(exact, rel=0.1)


def test_phi_padded_layout_and_gradient():
    rng = np.random.default_rng(1)
    Ps, Qs = _unit_columns(rng, 5, (2, 3, 5)), _unit_columns(rng, 4, (1, 4))
    padded_p = sharing._stack(Ps)
    assert padded_p.shape == (3, 5, 5)
    np.testing.assert_allclose(sharing.sharing_level(padded_p, Qs), sharing.sharing_level(Ps, Qs),
                               rtol=1e-6)
    dp, dq = nas.sharing_level_grad(Ps, Qs)
    ap, aq = jax.grad(sharing.sharing_level, argnums=(0, 1))(padded_p, sharing._stack(Qs))
    np.testing.assert_allclose(dp, ap, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dq, aq, rtol=1e-4, atol=1e-4)


def test_phi_maximal_for_nested_minimal_for_disjoint():
    c, widths = 12, (2, 4, 6)
    ordinal = aps.ordinal_transforms(c, widths)
    disjoint = aps.independent_transforms(c, widths)
    phi_o = float(nas.sharing_level(ordinal, ordinal))
    phi_d = float(nas.sharing_level(disjoint, disjoint))
    rng = np.random.default_rng(2)
    for _ in range(20):
        so = _semi_orthogonal(rng, c, widths), _semi_orthogonal(rng, c, widths)
        un = _unit_columns(rng, c, widths), _unit_columns(rng, c, widths)
        assert phi_d - 1e-3 <= float(nas.sharing_level(*so)) <= phi_o + 1e-3
        assert float(nas.sharing_level(*un)) >= phi_d - 1e-3   # disjoint: global minimum
    # nested = sum of min widths: for one axis, S = sum_{a<=b} min(c_a, c_b)
    assert float(sharing.pair_sum(ordinal)) == 2 * 3 + 4 * 2 + 6


def test_annealing_decreases_phi_and_keeps_unit_columns():
    widths = (4, 8, 12, 16)
    p = q = jnp.asarray(aps.ordinal_transforms(16, widths))
    alive = p.sum(1, keepdims=True) > 0
    p = sharing.normalize_columns(p + 1e-3 * jax.random.normal(jax.random.key(0), p.shape) * alive)
    q = sharing.normalize_columns(q + 1e-3 * jax.random.normal(jax.random.key(1), q.shape) * alive)
    phis = [float(nas.sharing_level(p, q))]
    for k in range(60):
        p, q = nas.anneal_step(p, q, 1e-3, "q" if (k // 10) % 2 == 0 else "p")
        phis.append(float(nas.sharing_level(p, q)))
    assert phis[-1] < 0.85 * phis[0]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(phis, phis[1:]))
    for t in (p, q):
        for a, w in enumerate(widths):
            np.testing.assert_allclose(np.linalg.norm(t[a][:, :w], axis=0), 1.0, atol=1e-5)
            assert not np.any(np.asarray(t[a][:, w:]))


# ------------------------------------------------------------------ controller
def test_reinforce_gradient_matches_analytic_on_categorical_policy():
    theta = jnp.asarray([0.3, -0.2, 0.5, 0.0])
    rewards = jnp.asarray([1.0, 0.2, 0.7, 0.4])
    probs = jax.nn.softmax(theta)
    baseline, w = 0.45, 0.0

    def surrogate_grad(a):
        def f(th):
            lp = jax.nn.log_softmax(th)[a]
            return ctrl_lib.reinforce_loss(lp[None], jnp.zeros(1), rewards[a][None], baseline, w)
        return jax.grad(f)(theta)

    expected = sum(probs[a] * surrogate_grad(a) for a in range(4))   # exact expectation
    analytic = -probs * (rewards - jnp.dot(probs, rewards))           # -d E[R] / d theta
    np.testing.assert_allclose(expected, analytic, atol=1e-6)
    # the entropy bonus: d H / d theta = -p (log p + H)
    ent = -jnp.sum(probs * jnp.log(probs))
    g = jax.grad(lambda th: ctrl_lib.reinforce_loss(
        jnp.zeros(1), ctrl_lib._entropy(th)[None], jnp.zeros(1), 0.0, 1.0))(theta)
    np.testing.assert_allclose(g, probs * (jnp.log(probs) + ent), atol=1e-6)
    # Monte Carlo estimate with samples from the policy
    acts = np.asarray(jax.random.categorical(jax.random.key(0), theta, shape=(20000,)))
    freq = np.bincount(acts, minlength=4) / len(acts)
    mc = sum(freq[a] * np.asarray(surrogate_grad(a)) for a in range(4))
    np.testing.assert_allclose(mc, analytic, atol=0.02)


def test_controller_sample_and_log_prob_agree_and_baseline():
    fm = flops_lib.FlopsModel(((1, 2), (1, 2, 3), (2, 4)), ((1.0, 0, 1), (1.0, 2, None)))
    c = ctrl_lib.Controller((2, 3, 2), hidden=16, rngs=nnx.Rngs(0))
    acts, lp, ent = nnx.jit(lambda c: ctrl_lib.sample(c, jax.random.key(1), 7, flops_model=fm,
                                                        budget=3.0))(c)
    assert acts.shape == (7, 3) and np.all(np.asarray(acts) < np.array([2, 3, 2]))
    lp2, ent2 = nnx.jit(lambda c, a: ctrl_lib.log_prob(c, a, flops_model=fm, budget=3.0))(c, acts)
    np.testing.assert_allclose(lp, lp2, rtol=1e-5)
    np.testing.assert_allclose(ent, ent2, rtol=1e-5)
    b, init = ctrl_lib.update_baseline(jnp.float32(0), jnp.float32(0), jnp.asarray([0.5, 0.7]))
    assert float(b) == pytest.approx(0.6)
    b, _ = ctrl_lib.update_baseline(b, init, jnp.asarray([1.6]), decay=0.99)
    assert float(b) == pytest.approx(0.61)
    r = ctrl_lib.reward(jnp.asarray([0.8, 0.8]), jnp.asarray([50.0, 200.0]), 100.0)
    np.testing.assert_allclose(r, [0.8, 0.8 * 2.0 ** -0.1], rtol=1e-6)


def test_beam_search_returns_exact_top_n():
    fm = flops_lib.FlopsModel(((1, 2, 3),) * 3, ((1.0, 0, 1), (2.0, 2, None)))
    c = ctrl_lib.Controller((3, 3, 3), hidden=8, rngs=nnx.Rngs(3))
    # make the policy peaked and prefix-dependent
    for h in c.heads:
        h.kernel.set_value(h.kernel[...] * 40)
    allarch = np.asarray(list(itertools.product(range(3), repeat=3)), np.int32)
    lp, _ = nnx.jit(lambda c, a: ctrl_lib.log_prob(c, a, flops_model=fm, budget=10.0))(
        c, jnp.asarray(allarch))
    order = np.argsort(-np.asarray(lp), kind="stable")[:5]
    top = ctrl_lib.beam_search(c, 5, beam_width=9, flops_model=fm, budget=10.0)
    assert [a for a, _ in top] == [tuple(allarch[k]) for k in order]
    np.testing.assert_allclose([s for _, s in top], np.asarray(lp)[order], rtol=1e-5)


# ------------------------------------------------------------------ FLOPs
def test_resnet_flops_model_against_hand_count():
    # 1 block per stage, 8x8x1 input, widths: stage0=4 inner0=2 stage1=8 inner1=3 stage2=5 inner2=6
    names, cands = spaces.cnn_decisions(1, (4, 8, 8), (0.25, 0.5, 0.75, 1.0))
    fm = flops_lib.resnet_flops_model([(4,), (2,), (8,), (3,), (5,), (6,)], blocks_per_stage=1,
                                      image_size=8, in_channels=1, num_classes=10)
    hand = (2 * 9 * 64 * 1 * 4            # stem 8x8
            + 2 * 9 * 64 * 4 * 2 + 2 * 9 * 64 * 2 * 4      # stage 0 block (8x8)
            + 2 * 9 * 16 * 4 * 3 + 2 * 9 * 16 * 3 * 8 + 2 * 16 * 4 * 8   # stage 1 (4x4) + proj
            + 2 * 9 * 4 * 8 * 6 + 2 * 9 * 4 * 6 * 5 + 2 * 4 * 8 * 5      # stage 2 (2x2) + proj
            + 2 * 5 * 10)                                    # classifier
    assert fm(np.zeros(6, np.int32)) == hand
    # the jit path agrees with the numpy path, and with XLA's count of the conv/dot FLOPs
    assert float(jax.jit(fm)(jnp.zeros(6, jnp.int32))) == hand
    assert len(names) == len(cands) == 6


def test_bert_flops_model_matches_shrink_accounting():
    from efficient_nlp import models
    from efficient_nlp.prune.shrink import flops as shrink_flops
    cands = [(1, 2), (16, 32)] * 2
    fm = flops_lib.bert_flops_model(cands, num_layers=2, hidden_size=16, head_dim=8, seq_len=12)
    cfg = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, head_dim=8, layer_num_attention_heads=(1, 2),
                            layer_intermediate_sizes=(32, 16))
    assert fm(np.asarray([0, 1, 1, 0])) == shrink_flops(cfg, 12)
    assert fm.partial(np.asarray([1, 1, 1, 1]), 2) == fm(np.asarray([1, 1, 0, 0]))


def test_child_network_is_physically_narrow():
    names, cands = spaces.cnn_decisions(1)
    arch = [1, 0, 2, 1, 3, 0]
    child = spaces.ApsResNet([(c[a],) for c, a in zip(cands, arch)], blocks_per_stage=1,
                             rngs=nnx.Rngs(0))
    assert child.blocks[0]["conv1"].kernel[...].shape == (3, 3, 8, 4)
    assert child.head.kernel[...].shape == (64, 10)
    assert all(m.p is None and m.q is None for _, m in aps.aps_layers(child))  # fixed widths
    assert jax.eval_shape(lambda: child(jnp.ones((2, 8, 8, 1)))).shape == (2, 10)


def test_choose_takes_the_largest_fitting_architecture_and_warns_when_none_fits(caplog):
    from efficient_nlp.nas import search
    top = [((0,), -0.1, 90.0), ((1,), -0.5, 40.0), ((2,), -0.2, 60.0), ((3,), -0.9, 60.0)]
    assert search.choose(top, None) == top[0]                     # no budget: the most likely
    assert search.choose(top, 70.0) == top[2]                     # closest from below; ties: most likely
    with caplog.at_level("WARNING"):
        assert search.choose(top, 30.0) == top[1]                 # none fits: the cheapest, announced
    assert "fits the FLOPs budget" in caplog.text
