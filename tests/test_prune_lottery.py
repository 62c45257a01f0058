"""Lottery tickets: iterative magnitude pruning with rewinding, driven through train.fit.

A tiny NNX MLP keeps the several compilations (one per round) fast."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import prune, train, tree


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def loss_fn(model, batch, rngs):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}


def batches(start):
    def gen():
        s = start
        while True:
            rng = np.random.default_rng(s)
            x = rng.normal(size=(8, 6)).astype(np.float32)
            yield {"x": x, "y": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)}
            s += 1
    return gen()


def config(steps=6):
    c = train.default_train_config()
    c.update(dict(num_steps=steps, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, log_every=3,
                  checkpoint_every=0, async_checkpointing=False, tensorboard=False, progress_bar=False))
    return c


def kernels(params):
    return {n: np.asarray(v) for n, v in tree.named_leaves(params) if n.endswith("kernel")}


def test_round_sparsity_and_masks_are_nested():
    assert prune.round_sparsity(0.875, 1, 3) == pytest.approx(0.5)
    assert prune.round_sparsity(0.875, 3, 3) == pytest.approx(0.875)
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(10, 10)), jnp.float32)}}
    rules = [prune.rule(r"kernel$", "unstructured", 0.875)]
    masks = None
    for r in (1, 2, 3):
        new = prune.imp_masks(params, rules, r, 3, masks)
        assert int((~np.asarray(new["a"]["kernel"])).sum()) == round(prune.round_sparsity(0.875, r, 3) * 100)
        if masks is not None:
            assert not np.any(np.asarray(new["a"]["kernel"]) & ~np.asarray(masks["a"]["kernel"]))
        # a survivor with a tiny weight is pruned before a large one
        params = {"a": {"kernel": params["a"]["kernel"] * 1.0}}
        masks = new


def test_lottery_ticket_rewinds_survivors_and_reaches_targets(tmp_path):
    rules = [prune.rule(r"kernel$", "unstructured", 0.875, "uniform")]
    rounds, k = 3, 2
    starts = {}
    res = prune.lottery_ticket(
        MLP(nnx.Rngs(0)), loss_fn, batches, config=config(), workdir=str(tmp_path), rules=rules,
        rounds=rounds, rewind_step=k,
        on_round_start=lambda r, m, masks: starts.update({r: (kernels(nnx.split(m, nnx.Param, ...)[1]),
                                                              masks and kernels(masks))}))
    # The rewind point, recomputed independently: k updates of the same dense run.
    early, _ = train.fit(MLP(nnx.Rngs(0)), loss_fn, batches, config=config(k),
                         workdir=str(tmp_path / "ref"), optimizer=train.make_optimizer(config(), 6))
    theta_k = kernels(nnx.split(early, nnx.Param, ...)[1])
    total = sum(v.size for v in theta_k.values())
    prev = None
    for r in range(1, rounds + 1):
        params, masks = starts[r]
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == sum(round(prune.round_sparsity(0.875, r, rounds) * m.size) for m in masks.values())
        for n, m in masks.items():
            np.testing.assert_array_equal(params[n][m], theta_k[n][m])  # survivors rewound exactly
            assert np.all(params[n][~m] == 0)
            if prev is not None:
                assert not np.any(m & ~prev[n])  # pruned weights never come back
        prev = masks
    final = kernels(nnx.split(res.model, nnx.Param, ...)[1])
    for n, m in prev.items():
        assert np.all(final[n][~m] == 0)  # stayed exactly zero through the last round's training
        assert np.any(final[n][m] != theta_k[n][m])  # and the survivors did train
    assert [row["round"] for row in res.rounds] == [0, 1, 2, 3]
    assert res.rounds[-1]["sparsity"] == pytest.approx(pruned / total)


def test_lottery_rejects_bad_arguments(tmp_path):
    rules = [prune.rule(r"kernel$", "unstructured", 0.5)]
    with pytest.raises(ValueError, match="rewind_step"):
        prune.lottery_ticket(MLP(nnx.Rngs(0)), loss_fn, batches, config=config(), workdir=str(tmp_path),
                             rules=rules, rounds=2, rewind_step=6)
    with pytest.raises(Exception, match="nothing|match"):
        prune.lottery_ticket(MLP(nnx.Rngs(0)), loss_fn, batches, config=config(), workdir=str(tmp_path),
                             rules=[prune.rule(r"nope$", "unstructured", 0.5)], rounds=2, rewind_step=1)
