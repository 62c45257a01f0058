"""Tests of the shared training / evaluation primitives: the step (`train.make_step`), the short-loop
runner (`train.run`), prediction (`train.predict`), latency (`train.measure_latency`), model copies
and the FLOPs counter (`models.flops.forward_flops`)."""
import dataclasses
import gc
import json
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _tiny import tiny_bert, token_batch  # noqa: E402
from efficient_nlp import data as data_lib  # noqa: E402
from efficient_nlp import models, train  # noqa: E402
from efficient_nlp.models import family as F  # noqa: E402
from efficient_nlp.models.cnn import SmallCNN, cnn_accuracy, fit_cnn  # noqa: E402
from efficient_nlp.models.flops import forward_flops  # noqa: E402
from efficient_nlp.prune.shrink import flops as shrink_flops  # noqa: E402
from efficient_nlp.train import distributed  # noqa: E402
from efficient_nlp.train.evaluate import placed_state  # noqa: E402


class Tiny(nnx.Module):
    """A linear regressor with dropout and a counter the forward pass updates."""

    def __init__(self, seed=0):
        self.dense = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
        self.out = nnx.Linear(3, 1, rngs=nnx.Rngs(seed + 1))
        self.dropout = nnx.Dropout(0.5)
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, rngs=None):
        self.calls[...] = self.calls[...] + 1
        h = self.dropout(jax.nn.relu(self.dense(x)), deterministic=rngs is None, rngs=rngs)
        return self.out(h)[:, 0]


def mse_loss(model, batch, rngs):
    err = model(batch["x"], rngs) - batch["y"]
    return jnp.mean(err ** 2), {"abs_err": jnp.abs(err)}


def tiny_batches(n, seed=0, rows=8):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(rows, 4)).astype(np.float32), "y": rng.normal(size=rows).astype(np.float32)}
            for _ in range(n)]


ADAM = optax.adam(1e-2)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- make_step
def test_make_step_equals_a_hand_written_optax_update():
    model = Tiny()
    graphdef, state = train.init_state(model, ADAM)
    batch = jax.tree.map(jnp.asarray, tiny_batches(1)[0])
    key = jax.random.key(3)

    @jax.jit
    def by_hand(params, rest, opt_state):
        def loss(p):
            m = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest))
            value = mse_loss(m, batch, nnx.Rngs(dropout=key))[0]
            return value, nnx.state(m, nnx.Not(nnx.Param))
        (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = ADAM.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, value, optax.global_norm(grads)

    params, rest, opt_state, loss, norm = by_hand(state.params, state.rest, state.opt_state)
    new, metrics = jax.jit(train.make_step(mse_loss, ADAM), static_argnums=0)(graphdef, state, batch, key)
    for a, b in zip(leaves((params, rest, opt_state)), leaves((new.params, new.rest, new.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1 and int(nnx.to_pure_dict(new.rest)["calls"]) == 1
    assert float(metrics["loss"]) == float(loss) and float(metrics["grad_norm"]) == float(norm)
    assert set(metrics) == {"loss", "grad_norm", "abs_err", "nonfinite"} and not bool(metrics["nonfinite"])
    assert metrics["abs_err"].shape == (8,)  # aux values as the loss returned them ...
    means = train.mean_metrics(metrics)  # ... averaged for logging
    assert means["abs_err"].shape == () and float(means["abs_err"]) == pytest.approx(float(metrics["abs_err"].mean()))

    bad = dict(batch, y=batch["y"].at[0].set(jnp.nan))
    _, metrics = train.make_step(mse_loss, ADAM)(graphdef, state, bad, key)
    assert bool(metrics["nonfinite"])


@pytest.mark.parametrize("n", [1, 7, 4096, 100_003])
def test_step_dropout_bits_are_jax_random_bits(n):
    """The unrolled Threefry of the dropout masks gives jax.random.bits's words exactly."""
    from efficient_nlp.models.dropout import _bits32, threefry_bits32

    for key in (jax.random.key(0), jax.random.fold_in(jax.random.key(11), 5)):
        want = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
        np.testing.assert_array_equal(np.asarray(jax.jit(threefry_bits32, static_argnums=1)(key, n)), want)
        np.testing.assert_array_equal(np.asarray(_bits32(key, n)), want)
    rbg = jax.random.key(3, impl="rbg")  # other implementations: jax.random.bits itself
    np.testing.assert_array_equal(np.asarray(_bits32(rbg, n)), np.asarray(jax.random.bits(rbg, (n,), jnp.uint32)))


def test_step_dropout_masks_equal_the_jax_random_bits_masks():
    """Dropout masks equal those drawn by jax.random.bits (what the dropout used before its
    unrolled Threefry); a BERT's loss and gradients with them agree to float rounding (the two
    programs are compiled, hence fused, differently)."""
    from efficient_nlp.models import dropout as dropout_lib

    x = jnp.ones((3, 5, 7))
    drop = jax.jit(lambda k: dropout_lib.dropout(x, 0.25, k))
    fast_mask = np.asarray(drop(jax.random.key(5)))

    cfg = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, num_labels=2, max_position_embeddings=16,
                            hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in token_batch(4, 9, 50).items()}

    def loss_and_grads():
        def loss(m):
            out = m(batch["input_ids"], batch["attention_mask"], deterministic=False, rngs=nnx.Rngs(dropout=7))
            return jnp.sum(out.logits ** 2)
        return jax.jit(nnx.value_and_grad(loss))(model)

    fast = loss_and_grads()
    original = dropout_lib._bits32
    dropout_lib._bits32 = lambda key, n: jax.random.bits(key, (n,), jnp.uint32)
    try:
        slow = loss_and_grads()
        slow_mask = np.asarray(jax.jit(lambda k: dropout_lib.dropout(x, 0.25, k))(jax.random.key(5)))
    finally:
        dropout_lib._bits32 = original
    np.testing.assert_array_equal(fast_mask, slow_mask)
    assert 0 < (fast_mask == 0).sum() < fast_mask.size
    for a, b in zip(leaves(fast), leaves(slow)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- run
def test_run_equals_an_explicit_loop_and_leaves_the_model_alone():
    model = Tiny()
    before = leaves(nnx.state(model))
    batches = tiny_batches(5)
    trained, history = train.run(model, mse_loss, ADAM, iter(batches), steps=5, seed=7)

    graphdef, state = train.init_state(Tiny(), ADAM)
    step = jax.jit(train.make_step(mse_loss, ADAM), static_argnums=0)
    losses = []
    for t, batch in enumerate(batches, 1):
        state, metrics = step(graphdef, state, batch, jax.random.fold_in(jax.random.key(7), t))
        losses.append(float(metrics["loss"]))
    for a, b in zip(leaves((state.params, state.rest)), leaves(nnx.split(trained, nnx.Param, ...)[1:])):
        np.testing.assert_array_equal(a, b)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in history] == losses
    assert set(history[0]) == {"step", "loss", "grad_norm", "abs_err"}
    for a, b in zip(before, leaves(nnx.state(model))):  # donation never touched the caller's arrays
        np.testing.assert_array_equal(a, b)


def test_run_compiles_once_for_repeated_loops_and_does_not_keep_the_loss_alive():
    traces = []

    def counting_loss(model, batch, rngs):
        traces.append(1)
        return mse_loss(model, batch, rngs)

    for seed in range(3):  # e.g. one reconstruction per matmul of the same shape
        train.run(Tiny(seed), counting_loss, ADAM, tiny_batches(2, seed), steps=2)
    assert len(traces) == 1

    class Closure:  # a loss holding data (a teacher, say)
        def __init__(self):
            self.scale = jnp.ones(())

        def __call__(self, model, batch, rngs):
            loss, aux = mse_loss(model, batch, rngs)
            return loss * self.scale, aux

    loss = Closure()
    ref = weakref.ref(loss)
    train.run(Tiny(), loss, ADAM, tiny_batches(1), steps=1)
    del loss
    gc.collect()
    assert ref() is None


def test_run_callback_sees_progress_and_stops_early():
    seen = []

    def callback(progress):
        seen.append((progress.step, float(progress.metrics["loss"]),
                     int(nnx.to_pure_dict(nnx.state(progress.model(), nnx.BatchStat))["calls"])))
        return progress.step == 3

    trained, history = train.run(Tiny(), mse_loss, ADAM, tiny_batches(10), steps=10, callback=callback)
    assert [s[0] for s in seen] == [1, 2, 3] and [s[2] for s in seen] == [1, 2, 3]
    assert [h["loss"] for h in history] == [s[1] for s in seen]
    with pytest.raises(ValueError, match="ran out before update 3"):
        train.run(Tiny(), mse_loss, ADAM, tiny_batches(2), steps=3)
    bad = tiny_batches(3)
    bad[1]["y"][0] = np.nan
    with pytest.raises(train.NonFiniteLossError, match="update 2") as info:
        train.run(Tiny(), mse_loss, ADAM, bad, steps=3)
    assert info.value.step == 2


def test_copy_model_is_independent():
    model = Tiny()
    copy = train.copy_model(model)
    copy.dense.kernel[...] = jnp.zeros((4, 3))
    assert np.abs(np.asarray(model.dense.kernel[...])).sum() > 0


# ----------------------------------------------------------------------------- predict
def _tiny_family(kind):
    if kind == "bert":
        return tiny_bert()
    extra = dict(roberta=dict(pad_token_id=1, max_position_embeddings=40, type_vocab_size=1),
                 distilbert=dict(type_vocab_size=0))[kind]
    cfg = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, num_labels=3, model_type=kind, **extra)
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_predict_equals_the_direct_forward(kind):
    model = _tiny_family(kind)
    batch = token_batch(20, 12, 50)
    if kind == "distilbert":
        batch.pop("token_type_ids")
    logits = train.predict(model, batch, 8)  # 3 batches (split over up to 8 devices), the last one padded
    np.testing.assert_allclose(logits, np.asarray(F.forward(model, batch).logits), rtol=1e-5, atol=1e-6)


def test_predict_reuses_placed_parameters():
    """Parameters already replicated over the mesh (a single-device model on a one-device mesh,
    a model placed there before) are used as they are."""
    model = tiny_bert()
    mesh = distributed.make_mesh()
    if mesh.size > 1:  # several devices: the first evaluation replicates the model
        model = nnx.merge(*placed_state(model, mesh))
    own = jax.tree.leaves(nnx.state(model))
    with jax.transfer_guard("disallow_explicit"):  # nothing is copied to or from the host
        _, state = placed_state(model, mesh)
    assert all(a is b for a, b in zip(own, jax.tree.leaves(state)))
    # replicate still always makes new buffers (safe to donate); shard_batch keeps placed arrays
    copied = distributed.replicate(own[0], mesh)
    buffers = lambda a: {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}  # noqa: E731
    assert copied is not own[0] and not buffers(copied) & buffers(own[0])
    x = jnp.ones((8, 3)) if mesh.size == 1 else distributed.shard_batch({"x": np.ones((8, 3))}, mesh)["x"]
    assert distributed.shard_batch({"x": x}, mesh)["x"] is x


def test_four_devices():
    """run on a 4-device mesh matches one device; predict places a model once (no host copies)."""
    code = r"""
import json, jax, jax.numpy as jnp, numpy as np, optax, sys
from flax import nnx
sys.path.insert(0, "tests")
import test_step as t
from efficient_nlp import train
from efficient_nlp.train import distributed
from efficient_nlp.train.evaluate import placed_state
mesh = distributed.make_mesh()
batches = t.tiny_batches(4)
one, h1 = train.run(t.Tiny(), t.mse_loss, t.ADAM, batches, steps=4)
four, h4 = train.run(t.Tiny(), t.mse_loss, t.ADAM, batches, steps=4, mesh=mesh)
diff = max(float(np.abs(a - b).max()) for a, b in zip(t.leaves(nnx.state(one)), t.leaves(nnx.state(four))))
model = t.tiny_bert()
with jax.transfer_guard_host_to_device("disallow_explicit"), jax.transfer_guard_device_to_host("disallow_explicit"):
    _, state = placed_state(model, mesh)         # device to device only
    _, again = placed_state(nnx.merge(*nnx.split(model)[:1], state), mesh)
same = all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)))
batch = t.token_batch(10, 12, 50)
pred = float(np.abs(train.predict(model, batch, 4) - np.asarray(t.F.forward(model, batch).logits)).max())
print("RESULT " + json.dumps(dict(devices=jax.device_count(), diff=diff, same=same, pred=pred)))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["devices"] == 4 and r["same"]
    assert r["diff"] < 1e-5 and r["pred"] < 1e-5


# ----------------------------------------------------------------------------- CNN
def test_fit_cnn_trains_in_place_and_cnn_accuracy_matches_a_direct_count():
    split = data_lib.load_digits(seed=0)
    model = SmallCNN((4, 4), (True, True), 16, rngs=nnx.Rngs(0))
    images, labels = split["test"]["images"], split["test"]["labels"]
    before = cnn_accuracy(model, images, labels, batch_size=128)
    loss = fit_cnn(model, split["train"]["images"], split["train"]["labels"], steps=120, seed=0)
    after = cnn_accuracy(model, images, labels, batch_size=128)
    direct = float(np.mean(np.argmax(np.asarray(model(images)), -1) == labels))
    assert np.isfinite(loss) and after == pytest.approx(direct) and after > before + 0.2, (before, after)


# ----------------------------------------------------------------------------- FLOPs
BERT_CONFIGS = [
    dict(),
    dict(head_dim=24, num_attention_heads=3),
    dict(layer_num_attention_heads=(4, 0, 2), layer_intermediate_sizes=(10, 37, 0)),
]


@pytest.mark.parametrize("overrides", BERT_CONFIGS)
@pytest.mark.parametrize("seq_len", [1, 7, 128])
def test_forward_flops_reproduces_shrink_flops_on_bert(overrides, seq_len):
    cfg = models.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=96).replace(**overrides)
    assert forward_flops(cfg, seq_len) == shrink_flops(cfg, seq_len)
    assert forward_flops(cfg, seq_len, batch=3) == 3 * shrink_flops(cfg, seq_len)
    assert forward_flops(cfg, seq_len, classifier=True) == forward_flops(cfg, seq_len) + 2 * 64 * cfg.num_labels


def test_forward_flops_of_a_shrunk_model_and_of_every_matmul():
    from efficient_nlp import quant

    model = tiny_bert(layers=3, heads=4, hidden=16, intermediate=24)
    small = F.resized(model, heads=[[0, 1], [], [2]], neurons=[list(range(5)), list(range(24)), []])
    assert forward_flops(small, 9) == shrink_flops(small.config, 9)
    electra = models.BertForSequenceClassification(
        models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24, model_type="electra", embedding_size=8), rngs=nnx.Rngs(0))
    for m in (model, small, electra):  # every matmul of the forward pass, as traced by quant.cost_report
        rows = quant.cost_report(m, None, token_batch(2, 9, 50)).rows
        per_site = {r["site"]: r["flops"] for r in rows}  # (BERT's pooler is traced twice)
        assert forward_flops(m, 9, classifier=True) == sum(per_site.values())


@dataclasses.dataclass(frozen=True)
class _Decoderish:
    """A BertConfig seen as a decoder's: grouped-query attention and another family's name."""
    base: models.BertConfig
    model_type: str
    num_key_value_heads: int

    def __getattr__(self, name):
        return getattr(self.base, name)


def test_forward_flops_counts_kv_heads_and_a_gated_ffn():
    cfg = models.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96)
    t, h, d, n = 10, 64, 16, 4
    bert = F.get_family("bert")
    gated = dataclasses.replace(bert, name="gated_test", model_types=("gated_test",),
                                layer_sites={**bert.layer_sites, "ffn_gate": "ffn.gate"},
                                site_inputs={**bert.site_inputs, "ffn_gate": bert.site_inputs["ffn_in"]})
    F.register(gated)
    try:
        got = forward_flops(_Decoderish(cfg, "gated_test", 2), t)
    finally:
        F._FAMILIES.pop("gated_test")
    per_layer = 2 * t * h * d * (2 * n + 2 * 2) + 2 * t * t * d * n * 2 + 2 * t * h * 96 * 3
    assert got == 2 * per_layer + 2 * h * h
    assert forward_flops(_Decoderish(cfg, "bert", 4), t) == forward_flops(cfg, t)


# ----------------------------------------------------------------------------- latency
def test_latency_helpers_return_positive_medians():
    model = tiny_bert()
    small = F.resized(model, heads=[[0], [1]])
    batch = train.token_batch(model.config.vocab_size, 2, 8)
    assert train.measure_latency(model, batch, repeats=3, warmup=1) > 0
    both = train.compare_latency([model, small], batch, repeats=2, warmup=1, rounds=2)
    assert len(both) == 2 and all(s > 0 for s in both)
    cnn = SmallCNN((4,), (True,), 8, rngs=nnx.Rngs(0))
    assert train.measure_latency(cnn, np.zeros((2, 8, 8, 1), np.float32), repeats=2, warmup=1) > 0
    fn = jax.jit(lambda a, b: a @ b)
    x = jnp.ones((16, 16))
    assert train.measure_latency(fn, (x, x), repeats=2, warmup=1) > 0
    with pytest.raises(ValueError, match="repeats"):
        train.compare_latency([fn], (x, x), repeats=0)
