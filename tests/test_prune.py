"""efficient_nlp.prune: scores, patterns, distributions, schedules, optax wrapper, prox operators.

Everything on small arrays against NumPy; jit where the code is meant to run jitted."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficient_nlp import prune, tree

RNG = np.random.default_rng(0)


def rand(*shape):
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


# ----------------------------------------------------------------------------- scores
def test_scores_against_numpy():
    w, g = {"a": rand(3, 4)}, {"a": rand(3, 4)}
    np.testing.assert_array_equal(prune.magnitude_score(w)["a"], np.abs(w["a"]))
    np.testing.assert_array_equal(prune.movement_score(w, g)["a"], -np.asarray(g["a"]) * np.asarray(w["a"]))
    np.testing.assert_array_equal(prune.saliency_score(w, g)["a"], np.abs(np.asarray(w["a"]) * np.asarray(g["a"])))
    r1, r2 = prune.random_score(w, jax.random.key(1)), prune.random_score(w, jax.random.key(1))
    np.testing.assert_array_equal(r1["a"], r2["a"])
    assert 0 <= float(r1["a"].min()) and float(r1["a"].max()) < 1
    # Accumulated movement: -sum_t g_t * W_t, with W_t the dense weight: once a weight is stored
    # as 0 (pruned), its score keeps moving with the value it had (straight-through, Sanh et al.).
    crit = prune.movement()
    s = crit.init(w)
    for _ in range(3):
        s = crit.accumulate(s, w, g)
    wa, ga = np.asarray(w["a"]), np.asarray(g["a"])
    np.testing.assert_allclose(crit.score(w, s)["a"], -3 * ga * wa, rtol=1e-6)
    pruned = {"a": w["a"].at[0].set(0.0)}
    for _ in range(2):
        s = crit.accumulate(s, pruned, g)
    np.testing.assert_allclose(crit.score(w, s)["a"], -5 * ga * wa, rtol=1e-6)
    np.testing.assert_array_equal(crit.restore(pruned, s)["a"], wa)


# ----------------------------------------------------------------------------- patterns
def test_topk_mask_equals_a_stable_argsort_with_ties_signed_zeros_and_infinities():
    from efficient_nlp.prune.patterns import kth_smallest
    rng = np.random.default_rng(0)
    special = np.array([-0.0, 0.0, -np.inf, np.inf, 3.0, -3.0, 0.0, -0.0, 1e-30, -1e-30], np.float32)
    for scores in (rng.integers(0, 5, 300).astype(np.float32), rng.normal(size=257).astype(np.float32),
                   special, np.full(7, 2.5, np.float32)):
        n = scores.size
        ranks = np.empty(n, np.int64)
        ranks[np.argsort(scores, kind="stable")] = np.arange(n)
        for k in sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 5, -1}):
            want = ranks >= np.clip(k, 0, n)
            np.testing.assert_array_equal(prune.topk_mask(jnp.asarray(scores), k), want, err_msg=f"k={k}")
            np.testing.assert_array_equal(jax.jit(prune.topk_mask)(jnp.asarray(scores), jnp.int32(k)), want)
            kth = np.sort(scores)[min(max(k, 1), n) - 1] if k > 0 else 0.0
            assert float(kth_smallest(jnp.asarray(scores), k)) == kth or (kth == 0 and k > 0), k


def test_topk_and_nm_masks_against_numpy():
    s = np.array([3.0, 1.0, 2.0, 1.0, 5.0], np.float32)
    np.testing.assert_array_equal(prune.topk_mask(jnp.asarray(s), 2), [True, False, True, False, True])
    np.testing.assert_array_equal(jax.jit(prune.topk_mask)(jnp.asarray(s), jnp.int32(3)),
                                  [True, False, False, False, True])
    x = np.asarray(rand(4, 8))
    mask = np.asarray(prune.nm_mask(jnp.asarray(x), 2, 4, axis=-1))
    for row in range(4):
        for b in range(2):
            blk = x[row, 4 * b:4 * b + 4]
            want = np.zeros(4, bool)
            want[np.argsort(-blk)[:2]] = True
            np.testing.assert_array_equal(mask[row, 4 * b:4 * b + 4], want)
    mask0 = np.asarray(prune.nm_mask(jnp.asarray(x), 1, 2, axis=0))
    assert (mask0.reshape(2, 2, 8).sum(1) == 1).all()


def one_shot(params, rules, scores=None):
    return prune.make_masks(params, rules, scores)


def test_block_and_neuron_patterns_against_numpy():
    w = {"k": rand(4, 6)}
    m = np.asarray(one_shot(w, [prune.rule("k", "block", 0.5, block_shape=(2, 3))])["k"])
    blocks = np.abs(np.asarray(w["k"])).reshape(2, 2, 2, 3).sum((1, 3))
    keep = blocks >= np.sort(blocks.ravel())[2]
    np.testing.assert_array_equal(m, np.repeat(np.repeat(keep, 2, 0), 3, 1))
    m = np.asarray(one_shot(w, [prune.rule("k", "neurons", 0.5)])["k"])
    cols = np.abs(np.asarray(w["k"])).sum(0)
    np.testing.assert_array_equal(m, np.broadcast_to(cols >= np.sort(cols)[3], (4, 6)))
    m = np.asarray(one_shot(w, [prune.rule("k", "rows", 0.25)])["k"])
    rows = np.abs(np.asarray(w["k"])).sum(1)
    np.testing.assert_array_equal(m, np.broadcast_to((rows > rows.min())[:, None], (4, 6)))
    m = np.asarray(one_shot(w, [prune.rule("k", "n_m", n=1, m=3)])["k"])
    assert (m.reshape(4, 2, 3).sum(-1) == 1).all()


def attention_params(n_layers=2, heads=4, d=2, h=6):
    p = {}
    for i in range(n_layers):
        a = {name: {"kernel": rand(h, heads * d), "bias": rand(heads * d)} for name in ("query", "key", "value")}
        a["output"] = {"kernel": rand(heads * d, h), "bias": rand(h)}
        p[str(i)] = {"attention": a, "ffn": {"intermediate": {"kernel": rand(h, 5), "bias": rand(5)},
                                              "output": {"kernel": rand(5, h), "bias": rand(h)}}}
    return {"layers": p}


HEADS = r"attention\.(query|key|value)\.(kernel|bias)$|attention\.output\.kernel$"


def test_heads_group_qkv_columns_and_output_rows_of_a_head():
    p = attention_params()
    masks = one_shot(p, [prune.rule(HEADS, "heads", 0.5, "uniform", head_dim=2)])
    for i in ("0", "1"):
        a, am = p["layers"][i]["attention"], masks["layers"][i]["attention"]
        score = sum(np.abs(np.asarray(a[n]["kernel"])).reshape(6, 4, 2).sum((0, 2)) for n in ("query", "key", "value"))
        score = score + sum(np.abs(np.asarray(a[n]["bias"])).reshape(4, 2).sum(1) for n in ("query", "key", "value"))
        score = score + np.abs(np.asarray(a["output"]["kernel"])).reshape(4, 2, 6).sum((1, 2))
        keep = score >= np.sort(score)[2]
        for n in ("query", "key", "value"):
            np.testing.assert_array_equal(am[n]["kernel"], np.broadcast_to(np.repeat(keep, 2), (6, 8)))
            np.testing.assert_array_equal(am[n]["bias"], np.repeat(keep, 2))
        np.testing.assert_array_equal(am["output"]["kernel"], np.broadcast_to(np.repeat(keep, 2)[:, None], (8, 6)))
        assert am["output"]["bias"].shape == ()  # not selected: a broadcasting True
    with pytest.raises(prune.PatternError, match="output.bias"):
        one_shot(p, [prune.rule(r"attention\..*", "heads", 0.5, head_dim=2)])


def test_ffn_neurons_and_layers_patterns():
    p = attention_params()
    m = one_shot(p, [prune.rule(r"ffn\.(intermediate\.(kernel|bias)|output\.kernel)$", "ffn_neurons", 0.4, "uniform")])
    f = m["layers"]["0"]["ffn"]
    keep = np.asarray(f["intermediate"]["bias"])
    assert keep.sum() == 3
    np.testing.assert_array_equal(f["intermediate"]["kernel"], np.broadcast_to(keep, (6, 5)))
    np.testing.assert_array_equal(f["output"]["kernel"], np.broadcast_to(keep[:, None], (5, 6)))
    m = one_shot(p, [prune.rule(r"kernel$", "layers", 0.5)])
    kept = [bool(np.asarray(m["layers"][i]["ffn"]["output"]["kernel"]).all()) for i in ("0", "1")]
    assert sorted(kept) == [False, True]
    for i in ("0", "1"):  # every kernel of a layer shares its fate
        assert {bool(np.asarray(x).all()) for x in jax.tree.leaves(m["layers"][i]) if np.ndim(x)} == {kept[int(i)]}


# ----------------------------------------------------------------------------- distributions
def test_global_with_per_tensor_normalisation_uniform_erk_and_custom():
    p = {"a": rand(8, 8), "b": 10 * rand(4, 16)}  # b has 10x the scale
    m = one_shot(p, [prune.rule(".", "unstructured", 0.5, "global", normalize=False)])
    assert int(np.sum(~np.asarray(m["a"]))) + int(np.sum(~np.asarray(m["b"]))) == 64
    assert np.asarray(m["a"]).mean() < 0.2  # without normalisation the small tensor is wiped out
    m = one_shot(p, [prune.rule(".", "unstructured", 0.5, "global")])
    na = np.abs(np.asarray(p["a"])) / np.abs(np.asarray(p["a"])).mean()
    nb = np.abs(np.asarray(p["b"])) / np.abs(np.asarray(p["b"])).mean()
    thr = np.sort(np.concatenate([na.ravel(), nb.ravel()]))[64]
    np.testing.assert_array_equal(m["a"], na >= thr)
    np.testing.assert_array_equal(m["b"], nb >= thr)
    m = one_shot(p, [prune.rule(".", "unstructured", 0.75, "uniform")])
    assert int(np.sum(~np.asarray(m["a"]))) == 48 and int(np.sum(~np.asarray(m["b"]))) == 48
    m = one_shot(p, [prune.rule(".", "unstructured", 0.5, {"^a$": 0.25})])
    assert int(np.sum(~np.asarray(m["a"]))) == 16 and int(np.sum(~np.asarray(m["b"]))) == 32
    big = {"small": rand(4, 4), "wide": rand(64, 64)}
    plan = prune.make_plan(big, [prune.rule(".", "unstructured", 0.8, "erk")])
    s = {g.key: g.sparsity for g in plan.groups.values()}
    # ERK: density ~ (sum of dims) / (number of weights); total sparsity is the target.
    assert s["small"] == 0.0  # ERK's density for it would exceed 1: kept dense
    assert (s["wide"] * 4096) / (16 + 4096) == pytest.approx(0.8, abs=1e-6)
    two = {"x": rand(16, 16), "y": rand(32, 32)}
    plan = prune.make_plan(two, [prune.rule(".", "unstructured", 0.5, "erk")])
    s = {g.key: g.sparsity for g in plan.groups.values()}
    assert (s["x"] * 256 + s["y"] * 1024) / 1280 == pytest.approx(0.5, abs=1e-6)
    np.testing.assert_allclose((1 - s["x"]) / (1 - s["y"]), (32 / 256) / (64 / 1024), rtol=1e-6)


def test_impossible_targets_and_bad_rules_fail_clearly():
    p = {"a": rand(4, 6)}
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\)"):
        prune.make_plan(p, [prune.rule("a", "unstructured", 1.0)])
    with pytest.raises(ValueError, match="custom sparsity"):
        prune.make_plan(p, [prune.rule("a", "unstructured", 0.5, {"a": -0.1})])
    with pytest.raises(tree.RuleError, match="matches no leaf"):
        prune.make_plan(p, [prune.rule("kernal", "unstructured", 0.5)])
    with pytest.raises(tree.RuleError, match="not a valid regular expression"):
        prune.make_plan(p, [prune.rule("a[", "unstructured", 0.5)])
    with pytest.raises(prune.PatternError, match="multiple of M=4"):
        prune.make_plan(p, [prune.rule("a", "n_m", n=2, m=4)])
    with pytest.raises(prune.PatternError, match="does not tile"):
        prune.make_plan(p, [prune.rule("a", "block", 0.5, block_shape=(4, 4))])
    with pytest.raises(ValueError, match="unknown distribution"):
        prune.make_plan(p, [prune.rule("a", "unstructured", 0.5, "erdos")])
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        prune.rule("a", "diagonal", 0.5)
    with pytest.raises(ValueError, match="begin_step < end_step"):
        prune.gradual_cubic(10, 5)


# ----------------------------------------------------------------------------- schedules + wrapper
def test_cubic_schedule_values():
    s = prune.gradual_cubic(10, 20, 5)
    for t, want in [(0, 0.0), (10, 0.0), (15, 1 - 0.5 ** 3), (20, 1.0), (99, 1.0)]:
        assert float(s.progress(t)) == pytest.approx(want)
    assert [t for t in range(30) if bool(s.update(t))] == [10, 15, 20]
    o = prune.one_shot(3)
    assert [float(o.progress(t)) for t in (2, 3, 4)] == [0.0, 1.0, 1.0] and bool(o.update(3))


def sgd_pruner(rules, schedule, criterion="magnitude", lr=0.01):
    return prune.pruning(optax.adam(lr), rules, criterion=criterion, schedule=schedule)


def test_exact_sparsity_reached_at_every_schedule_step_under_jit():
    p = {"w": rand(10, 10), "b": rand(10)}
    sched = prune.gradual_cubic(2, 8, 2)
    tx = sgd_pruner([prune.rule("w", "unstructured", 0.9)], sched)
    state = tx.init(p)

    @jax.jit
    def step(p, state):
        grads = jax.tree.map(jnp.ones_like, p)
        u, state = tx.update(grads, state, p)
        return optax.apply_updates(p, u), state

    last = 0
    for t in range(1, 11):
        p, state = step(p, state)
        mask = np.asarray(state.masks["w"])
        if bool(sched.update(t)):
            last = int(np.round(np.float32(0.9) * np.float32(sched.progress(t)) * 100))
        assert int((~mask).sum()) == last, t
        assert np.all(np.asarray(p["w"])[~mask] == 0.0)  # masks applied after the update
        assert state.masks["b"].shape == ()
    assert last == 90


def test_masked_gradients_zero_and_pruned_weights_stay_exactly_zero():
    p = {"w": rand(6, 6)}
    tx = prune.pruning(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.1)),
                       [prune.rule("w", "unstructured", 0.5)], schedule=prune.one_shot(0))
    state = tx.init(p)
    keep = np.asarray(state.masks["w"])
    assert (~keep).sum() == 18
    for _ in range(3):
        u, state = tx.update({"w": rand(6, 6)}, state, p)
        p = optax.apply_updates(p, u)
        assert np.all(np.asarray(p["w"])[~keep] == 0.0) and np.all(np.asarray(p["w"])[keep] != 0.0)
    mu = np.asarray(state.inner_state[1][0].mu["w"])
    assert np.all(mu[~keep] == 0.0)  # masked gradients never reached the moments


def test_moments_of_regrown_weights_are_reset():
    # A criterion whose scores are the last gradient: the gradients decide which weights live.
    crit = prune.Criterion("last_grad", lambda p: jax.tree.map(jnp.zeros_like, p),
                           lambda s, p, g: g, lambda p, s: s)
    p = {"w": jnp.ones((2, 4))}
    tx = prune.pruning(optax.adam(0.1), [prune.rule("w", "unstructured", 0.5, "uniform")], criterion=crit,
                       schedule=prune.gradual_cubic(0, 2, 1))
    state = tx.init(p)
    g_a = jnp.asarray([[1.0, 1, 0, 0], [1, 1, 0, 0]])
    g_b = jnp.asarray([[0.0, 0, 2, 2], [0, 0, 2, 2]])
    u, state = tx.update({"w": g_a + 0.1}, state, p)  # t=1: progress 7/8 -> 4 pruned: keep the 'a' half
    p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(state.masks["w"], g_a > 0)
    u, state = tx.update({"w": g_b + 0.1}, state, p)  # t=2: the 'b' half comes back, 'a' goes
    p = optax.apply_updates(p, u)
    regrown = np.asarray(g_b > 0)
    np.testing.assert_array_equal(state.masks["w"], regrown)
    adam = state.inner_state[0]
    assert np.all(np.asarray(adam.mu["w"])[regrown] == 0) and np.all(np.asarray(adam.nu["w"])[regrown] == 0)
    assert np.all(np.asarray(adam.mu["w"])[~regrown] != 0)  # the others keep their history
    assert np.all(np.asarray(p["w"])[~regrown] == 0)


def test_no_regrow_keeps_pruned_weights_pruned_and_the_sparsity_exact():
    crit = prune.Criterion("last_grad", lambda p: jax.tree.map(jnp.zeros_like, p),
                           lambda s, p, g: g, lambda p, s: s)
    p = {"w": jnp.ones((2, 4))}
    rules = [prune.rule("w", "unstructured", 0.75, "global")]
    tx = prune.pruning(optax.adam(0.1), rules, criterion=crit, schedule=prune.gradual_cubic(0, 3, 1), regrow=False)
    state = tx.init(p)
    g_a = jnp.asarray([[1.0, 1, 1, 0], [1, 1, 1, 0]])
    prev = np.ones((2, 4), bool)
    for g in (g_a, 3.0 - g_a, g_a):  # the scores flip, but what is pruned stays pruned
        u, state = jax.jit(tx.update)({"w": g + 0.1}, state, p)
        p = optax.apply_updates(p, u)
        m = np.asarray(state.masks["w"])
        assert not np.any(m & ~prev)
        prev = m
    assert int((~prev).sum()) == 6  # round(0.75 * 8) exactly at the end of the ramp
    assert np.all(np.asarray(p["w"])[~prev] == 0)


def test_given_masks_are_kept_fixed():
    p = {"w": rand(4, 4), "b": rand(4)}
    keep = np.asarray(RNG.random((4, 4)) > 0.5)
    tx = prune.pruning(optax.sgd(0.1), [prune.rule("^w$", "unstructured", 0.0)], masks={"w": keep})
    state = tx.init(p)
    for _ in range(2):
        u, state = jax.jit(tx.update)({"w": rand(4, 4), "b": rand(4)}, state, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(state.masks["w"], keep)
        assert np.all(np.asarray(p["w"])[~keep] == 0) and np.all(np.asarray(p["w"])[keep] != 0)
    with pytest.raises(ValueError, match="no mask"):
        prune.pruning(optax.sgd(0.1), [prune.rule("^(w|b)$", "unstructured", 0.0)], masks={"w": keep}).init(p)


def test_l1_and_group_soft_threshold_closed_forms():
    p = {"k": rand(4, 6), "bias": rand(6)}
    u = {"k": rand(4, 6), "bias": rand(6)}
    tx = prune.l1_soft_threshold("^k$", 0.5, learning_rate=0.4)
    out, _ = tx.update(u, tx.init(p), p)
    w = np.asarray(p["k"]) + np.asarray(u["k"])
    np.testing.assert_allclose(np.asarray(p["k"]) + np.asarray(out["k"]),
                               np.sign(w) * np.maximum(np.abs(w) - 0.2, 0), atol=1e-6)
    np.testing.assert_array_equal(out["bias"], u["bias"])  # not selected
    tx = prune.group_soft_threshold([("k", prune.neurons())], 1.0, learning_rate=lambda c: 1.5)
    out, _ = tx.update(u, tx.init(p), p)
    norms = np.linalg.norm(w, axis=0)
    want = w * np.maximum(0, 1 - 1.5 / norms)
    np.testing.assert_allclose(np.asarray(p["k"]) + np.asarray(out["k"]), want, atol=1e-5)
    assert (np.abs(want).sum(0) == 0).any() or norms.min() > 1.5
    # heads: the group is a head's Q/K/V columns and O rows together.
    a = attention_params(n_layers=1, heads=2, d=2, h=3)
    zero = jax.tree.map(jnp.zeros_like, a)
    tx = prune.group_soft_threshold([(HEADS, prune.heads(2))], strength=0.3)
    out, _ = tx.update(zero, tx.init(a), a)
    att = a["layers"]["0"]["attention"]
    sq = sum(np.square(np.asarray(att[n]["kernel"])).reshape(3, 2, 2).sum((0, 2)) +
             np.square(np.asarray(att[n]["bias"])).reshape(2, 2).sum(1) for n in ("query", "key", "value"))
    sq = sq + np.square(np.asarray(att["output"]["kernel"])).reshape(2, 2, 3).sum((1, 2))
    factor = np.maximum(0, 1 - 0.3 / np.sqrt(sq))
    got = np.asarray(att["output"]["kernel"]) + np.asarray(out["layers"]["0"]["attention"]["output"]["kernel"])
    np.testing.assert_allclose(got, np.asarray(att["output"]["kernel"]) * np.repeat(factor, 2)[:, None], rtol=1e-5)


# ----------------------------------------------------------------------------- movement regressions
def test_movement_at_step_zero_prunes_nothing_and_all_zero_scores_stay_finite():
    # Movement statistics are all zero at init: a schedule that updates at 0 (progress 0) must keep
    # everything, and a later ranking of all-zero / tied scores must remove exactly the target count
    # (no NaN from the per-tensor normalisation, no whole tensor removed).
    p = {"a": {"kernel": rand(8, 8)}, "b": {"kernel": rand(8, 4)}, "head": {"kernel": rand(4, 3)}}
    rules = [prune.rule(r"^(a|b)\.kernel$", "unstructured", 0.9, "global")]
    tx = sgd_pruner(rules, prune.gradual_cubic(0, 10, 5), criterion="movement")
    state = tx.init(p)
    assert all(bool(np.all(m)) for m in jax.tree.leaves(state.masks))
    from efficient_nlp.prune import masks as masks_lib
    plan = masks_lib.make_plan(p, rules)
    zeros = {n: jnp.zeros(plan.shapes[n]) for n in plan.names}
    for progress in (0.0, 0.5, 1.0):
        out = masks_lib.compute_masks(plan, zeros, progress)
        removed = sum(int((~np.asarray(m)).sum()) for m in out.values())
        assert removed == int(np.round(np.float32(0.9) * np.float32(progress) * 96)), progress


def test_movement_statistics_accumulate_under_jit_on_selected_leaves_only():
    p = {"w": rand(4, 4), "head": rand(4, 2)}
    tx = sgd_pruner([prune.rule("^w$", "unstructured", 0.5)], prune.gradual_cubic(0, 4, 2), criterion="movement")
    state = tx.init(p)
    g = {"w": rand(4, 4), "head": rand(4, 2)}
    step = jax.jit(tx.update)
    _, s1 = step(g, state, p)
    np.testing.assert_allclose(s1.stats["w"][0], -np.asarray(g["w"]) * np.asarray(p["w"]), rtol=1e-6)
    np.testing.assert_array_equal(s1.stats["w"][1], p["w"])           # the dense weight it ranks with
    assert s1.stats["head"].shape == () and s1.masks["head"].shape == ()  # the head is never masked
    # Sign: a weight the update pushes away from zero (-g * w > 0) survives the ranking.
    assert np.all(np.isfinite(np.asarray(s1.stats["w"])))


def test_movement_revives_a_pruned_weight_with_the_value_it_had():
    # Step 1 prunes half of w by movement; then gradients push a pruned weight away from zero
    # (its score keeps growing through the straight-through estimator) until the ranking revives
    # it: it returns with its value from before pruning, its Adam moments reset.
    p = {"w": jnp.asarray([1.0, -2.0, 3.0, -4.0])}
    from efficient_nlp.prune.schedules import Schedule
    every_step = Schedule("every_step", lambda c: jnp.where(c >= 1, 1.0, 0.0), lambda c: c >= 1)
    tx = prune.pruning(optax.adam(1e-3), [prune.rule("^w$", "unstructured", 0.5)], criterion="movement",
                       schedule=every_step)
    state = tx.init(p)
    g = {"w": jnp.asarray([-1.0, -1.0, 1.0, -1.0])}   # -g*w: +1, -2, -3, -4: keeps 0 and 1
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(state.masks["w"]), [True, True, False, False])
    assert float(p["w"][2]) == 0.0 and float(p["w"][3]) == 0.0
    g = {"w": jnp.asarray([0.0, 0.0, -5.0, 0.0])}      # weight 2 (value 3) would move away from zero
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    assert bool(state.masks["w"][2]) and int(np.sum(np.asarray(state.masks["w"]))) == 2
    stats = state.stats["w"]
    assert float(stats[0, 2]) == pytest.approx(-3.0 + 15.0)
    np.testing.assert_allclose(float(p["w"][2]), 3.0, rtol=1e-6)        # back with its value
    mu = jax.tree.leaves(state.inner_state)[1]                         # adam's first moment
    assert float(np.asarray(mu)[2]) == 0.0 and float(p["w"][3]) == 0.0


def test_learned_movement_scores_follow_adam_on_the_straight_through_gradient():
    # Sanh et al.'s scores: S is a parameter with gradient dL/dS = g * W (W the dense weight,
    # kept while pruned) and follows Adam; parity with optax.adam on S, pruned steps included.
    w, lr = {"a": rand(3, 4)}, 1e-2
    grads = [{"a": rand(3, 4)} for _ in range(6)]
    crit = prune.movement(learning_rate=lr)
    stats = crit.init(w)
    ref_tx = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    s_ref, opt = {"a": jnp.zeros((3, 4))}, ref_tx.init({"a": jnp.zeros((3, 4))})
    for i, g in enumerate(grads):
        stored = {"a": w["a"].at[0].set(0.0)} if i >= 3 else w   # row 0 pruned from step 3 on
        stats = jax.jit(crit.accumulate)(stats, stored, g)
        u, opt = ref_tx.update({"a": g["a"] * w["a"]}, opt)
        s_ref = optax.apply_updates(s_ref, u)
    np.testing.assert_allclose(crit.score(w, stats)["a"], s_ref["a"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(crit.restore(w, stats)["a"], w["a"])
    # Adam ranks by consistency: a steady small push away from zero beats an alternating large one,
    # while the summed score ranks the other way.
    w2 = {"a": jnp.ones(2)}
    seq = [{"a": jnp.asarray([-0.1, -10.0 if t % 2 else 9.0])} for t in range(6)]
    for c, first_wins in ((prune.movement(learning_rate=lr), True), (prune.movement(), False)):
        st = c.init(w2)
        for g in seq:
            st = c.accumulate(st, w2, g)
        sc = np.asarray(c.score(w2, st)["a"])
        assert (sc[0] > sc[1]) == first_wins, (c, sc)
    with pytest.raises(ValueError, match="bad arguments"):
        prune.get_criterion("movement", lr=1e-2)
    with pytest.raises(ValueError, match="must be > 0"):
        prune.movement(learning_rate=0.0)


def _toy_task(seed=0, n=1024, d=16, c=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, c)), -1)
    return jnp.asarray(x), jnp.asarray(y), c


@pytest.mark.parametrize("criterion", ["magnitude", "movement", prune.movement(learning_rate=1e-2)],
                         ids=["magnitude", "movement", "learned_movement"])
def test_gradual_pruning_to_90_percent_still_learns_a_toy_task(criterion):
    # Would catch: movement masking everything / the head, NaN scores, a frozen accumulator or a
    # sign error that removes the weights the task needs (the loss would stay at ln(C)).
    x, y, c = _toy_task()
    d, h = x.shape[1], 64
    k = jax.random.split(jax.random.key(0), 3)
    p = {"l0": {"kernel": jax.random.normal(k[0], (d, h)) / np.sqrt(d), "bias": jnp.zeros(h)},
         "l1": {"kernel": jax.random.normal(k[1], (h, h)) / np.sqrt(h), "bias": jnp.zeros(h)},
         "cls": {"kernel": jax.random.normal(k[2], (h, c)) * 0.01, "bias": jnp.zeros(c)}}

    def loss_fn(p, xb, yb):
        z = jax.nn.relu(xb @ p["l0"]["kernel"] + p["l0"]["bias"])
        z = z + jax.nn.relu(z @ p["l1"]["kernel"] + p["l1"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(z @ p["cls"]["kernel"] + p["cls"]["bias"], yb).mean()

    steps = 200
    tx = prune.pruning(optax.adam(3e-3), [prune.rule(r"^l\d\.kernel$", "unstructured", 0.9, "global")],
                       criterion=criterion, schedule=prune.gradual_cubic(0, int(0.6 * steps), 10))
    state = tx.init(p)

    @jax.jit
    def step(p, state, i):
        idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), (64,), 0, x.shape[0])
        g = jax.grad(loss_fn)(p, x[idx], y[idx])
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    for i in range(steps):
        p, state = step(p, state, i)
    kernels = [np.asarray(state.masks[n]["kernel"]) for n in ("l0", "l1")]
    assert 1 - sum(m.sum() for m in kernels) / sum(m.size for m in kernels) == pytest.approx(0.9, abs=1e-3)
    assert all(m.any(axis=0).sum() > 0 for m in kernels)  # no tensor removed entirely
    final = float(loss_fn(p, x, y))
    assert final < 0.6 * np.log(c)
