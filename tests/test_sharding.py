"""Tests of efficient_nlp.train.sharding and of fit / checkpoints on a (data, model) mesh.

Rules, presets and errors are checked in this process against a stand-in mesh (the specs are
pure functions of shapes and axis sizes). The ``test_multidevice_*`` cases need 4 or 8 devices:
they run directly when the process has them (XLA_FLAGS=--xla_force_host_platform_device_count=8)
and otherwise all together in one subprocess started by `test_multidevice_cases_in_a_subprocess`.
"""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from jax.sharding import PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _tiny  # noqa: E402
import _train_worker as w  # noqa: E402
from efficient_nlp import train, tree  # noqa: E402
from efficient_nlp.models import family as F  # noqa: E402
from efficient_nlp.train import sharding  # noqa: E402

# A sharded run equals the one-device run up to float reassociation of the split matmuls and
# reductions. Measured on CPU over 4 AdamW updates (lr 1e-2): equal losses, parameters within
# 5e-6 (Adam's normalisation magnifies the gradients' rounding differences).
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


def fake_mesh(data, model):
    """What the spec functions read of a mesh: axis names and sizes."""
    return types.SimpleNamespace(shape={"data": data, "model": model}, axis_names=("data", "model"))


def specs_by_name(specs):
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {tree.path_str(p): s for p, s in flat}


def bert_state(vocab=128):
    return train.init_state(_tiny.tiny_bert(vocab=vocab), optax.adamw(1e-3))[1]


# ----------------------------------------------------------------------------- mesh
def test_mesh_shape_resolves_the_remaining_devices():
    assert sharding.mesh_shape(None, 8) == {"data": 8, "model": 1}
    assert sharding.mesh_shape({"data": -1, "model": 2}, 8) == {"data": 4, "model": 2}
    assert sharding.mesh_shape({"model": -1, "data": 2}, 8) == {"data": 2, "model": 4}
    assert sharding.mesh_shape({"data": 2, "model": 2}, 4) == {"data": 2, "model": 2}


@pytest.mark.parametrize("shape, message", [
    ({"data": 2, "model": 2}, "needs 4 devices but there are 8"),
    ({"data": -1, "model": 3}, "8 is not a multiple of 3"),
    ({"data": -1, "model": -1}, "at most one -1"),
    ({"data": 8, "expert": 1}, "unknown axes ['expert']"),
])
def test_mesh_shape_errors(shape, message):
    with pytest.raises(sharding.ShardingError) as info:
        sharding.mesh_shape(shape, 8)
    assert message in str(info.value)


def test_default_mesh_is_all_devices_along_data():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}


# ----------------------------------------------------------------------------- presets
def test_replicated_preset_and_default_config_replicate_everything():
    specs = sharding.param_specs(bert_state(), "replicated", fake_mesh(4, 2))
    assert set(specs_by_name(specs).values()) == {P()}
    assert train.train_options(w.make_config()).sharding == "replicated"
    assert train.train_options(w.make_config()).mesh == {"data": -1, "model": 1}


def test_tensor_preset_splits_megatron_sites_and_adam_moments_follow():
    specs = specs_by_name(sharding.param_specs(bert_state(), "tensor", fake_mesh(2, 2)))
    layer = "params.bert.encoder.layers.1."
    for site in ("attention.query", "attention.key", "attention.value", "ffn.intermediate"):
        assert specs[layer + site + ".kernel"] == P(None, "model")
        assert specs[layer + site + ".bias"] == P("model")
    for site in ("attention.output", "ffn.output"):
        assert specs[layer + site + ".kernel"] == P("model")
        assert specs[layer + site + ".bias"] == P()
    assert specs["params.bert.embeddings.word_embeddings.embedding"] == P()
    assert specs["params.classifier.kernel"] == P()
    # AdamW's moments take their parameter's spec; its counts are replicated.
    for moment in ("mu", "nu"):
        assert specs[f"opt_state.0.{moment}.bert.encoder.layers.1.attention.query.kernel"] == P(None, "model")
        assert specs[f"opt_state.0.{moment}.bert.encoder.layers.1.ffn.output.kernel"] == P("model")
    counts = [s for n, s in specs.items() if n.endswith("count")]
    assert counts and set(counts) == {P()} and specs["step"] == P()


def test_tensor_preset_reads_the_family_of_a_decoder_and_of_a_wrapped_model():
    model = _tiny.tiny_decoder("llama")
    names = {s.role: s.path for s in F.sites(model) if s.layer == 0}
    wrapped = {"student": nnx.state(model, nnx.Param)}  # as in a distillation wrapper
    specs = specs_by_name(sharding.param_specs(wrapped, "tensor", fake_mesh(1, 2)))
    for role in ("q", "k", "v", "ffn_in", "ffn_gate"):
        assert specs[f"student.{names[role]}.kernel"] == P(None, "model"), role
    for role in ("o", "ffn_out"):
        assert specs[f"student.{names[role]}.kernel"] == P("model"), role


def test_fsdp_splits_the_largest_divisible_axis_of_big_leaves():
    specs = specs_by_name(sharding.param_specs(bert_state(vocab=128), "fsdp", fake_mesh(4, 1)))
    # 128 x 16 = 2048 elements >= FSDP_MIN_SIZE: split along its largest axis (128 rows).
    assert specs["params.bert.embeddings.word_embeddings.embedding"] == P("data")
    assert specs["opt_state.0.mu.bert.embeddings.word_embeddings.embedding"] == P("data")
    assert specs["params.bert.encoder.layers.0.attention.query.kernel"] == P()  # 256 elements
    rule = sharding.fsdp(min_size=0)
    mesh = fake_mesh(4, 2)
    assert rule((16, 24), mesh) == P(None, "data")        # 24 > 16, both divisible by 4
    assert rule((6, 8), mesh) == P(None, "data")          # 6 is not divisible by 4
    assert rule((6, 10), mesh) == P()                     # no axis divisible: replicated
    assert sharding.fsdp(min_size=0, base=(None, "model"))((16, 24), mesh) == P("data", "model")


def test_fsdp_plus_tensor_combines_both():
    state = bert_state(vocab=128)
    specs = specs_by_name(sharding.param_specs(state, sharding.preset_rules("fsdp+tensor"), fake_mesh(2, 2)))
    assert specs["params.bert.embeddings.word_embeddings.embedding"] == P("data")
    assert specs["params.bert.encoder.layers.0.attention.query.kernel"] == P(None, "model")  # small: no fsdp
    big = {"bert": {"encoder": {"layers": {"0": {"ffn": {"intermediate": {"kernel": jnp.zeros((64, 32))}}}}}}}
    got = specs_by_name(sharding.param_specs(big, "fsdp+tensor", fake_mesh(2, 2)))
    assert got["bert.encoder.layers.0.ffn.intermediate.kernel"] == P("data", "model")


def test_user_rules_first_match_wins():
    rules = [(r"layers\.0\..*query\.kernel$", ("model", None)), (r"query\.kernel$", (None, "model"))]
    specs = specs_by_name(sharding.param_specs(bert_state(), rules, fake_mesh(2, 2)))
    assert specs["params.bert.encoder.layers.0.attention.query.kernel"] == P("model")
    assert specs["params.bert.encoder.layers.1.attention.query.kernel"] == P(None, "model")
    assert specs["params.bert.encoder.layers.1.attention.key.kernel"] == P()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rules, error, message", [
    ([(r"query\.kernel$", (None, "model"))], sharding.ShardingError,
     "does not divide leaf bert.encoder.layers.0.attention.query.kernel of shape (16, 16) on mesh "
     "{'data': 2, 'model': 3}: dimension 1 (16) is not a multiple of 3"),
    ([(r"kernel$", ("tensor",))], sharding.ShardingError, "names axes ['tensor'] that the mesh lacks"),
    ([(r"query\.bias$", (None, "model"))], sharding.ShardingError, "has 2 entries but leaf"),
    ([(r"kernel$", ("data", "data"))], sharding.ShardingError, "uses a mesh axis twice"),
    ([(r"kernel$", (None, None)), (r"no_such_leaf", ("model",))], tree.RuleError, "rule 1 'no_such_leaf'"),
    (["kernel$"], sharding.ShardingError, "must be a (regex, spec) pair"),
    ("megatron", sharding.ShardingError, "unknown sharding preset 'megatron'"),
])
def test_rule_errors_name_the_problem(rules, error, message):
    params = nnx.state(_tiny.tiny_bert(), nnx.Param)
    with pytest.raises(error) as info:
        sharding.param_specs(params, rules, fake_mesh(2, 3))
    assert message in str(info.value)


# ----------------------------------------------------------------------------- checkpoints
class _Pair(nnx.Module):
    """A student trained towards a frozen teacher (as a distillation wrapper holds them)."""

    def __init__(self):
        self.student = w.make_model(seed=0)
        self.teacher = w.make_model(seed=1)


def _pair_loss(model, batch, rngs):
    logits = model.student(batch["ids"], deterministic=False, rngs=rngs)
    target = jax.lax.stop_gradient(model.teacher(batch["ids"]))
    return jnp.mean((logits - target) ** 2), {}


STUDENT = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("teacher")))


def _fit_pair(workdir, num_steps, **overrides):
    config = w.make_config(num_steps=num_steps, checkpoint_every=2, **overrides)
    return train.fit(_Pair(), _pair_loss, w.make_batches(8), config=config, workdir=workdir, trainable=STUDENT)


def test_frozen_teacher_is_not_checkpointed_and_resume_is_exact(tmp_path):
    workdir = epath.Path(tmp_path) / "run"  # an epath workdir, as for gs://
    _fit_pair(workdir, 2)
    saved = json.loads((workdir / "checkpoints" / "2" / "manifest" / "metadata").read_text())["leaves"]
    assert any(n.startswith("params/student/") for n in saved)
    assert not [n for n in saved if "teacher" in n]
    resumed, history = _fit_pair(workdir, 4)
    assert [r["step"] for r in history if "loss" in r][0] == 3
    straight, _ = _fit_pair(epath.Path(tmp_path) / "straight", 4)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(straight))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    teacher = nnx.state(_Pair().teacher)  # the teacher came back from the model given
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.teacher)), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checksums_do_not_depend_on_layout_and_catch_changes():
    from efficient_nlp.train.checkpoint import device_checksums
    x = np.arange(24 * 16, dtype=np.float32).reshape(24, 16)
    base = device_checksums([x])[0]
    assert device_checksums([jnp.asarray(x)]) == [base]
    flipped = x.copy()
    flipped[3, 4] = np.nextafter(flipped[3, 4], np.inf)  # one bit
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert len({base, *device_checksums([flipped, swapped, x.reshape(16, 24).T.copy()])}) == 4
    bf16 = jnp.asarray(x, jnp.bfloat16)
    assert device_checksums([bf16]) != device_checksums([bf16.at[0, 0].add(1)])


# ----------------------------------------------------------------------------- several devices
def needs(n):
    return pytest.mark.skipif(jax.device_count() < n, reason=f"needs {n} devices (run in a subprocess)")


def bert_batches(start, batch_size=8, length=8, vocab=128):
    k = start
    while True:
        batch = _tiny.token_batch(batch_size, length, vocab, seed=k)
        batch["labels"] = (batch["input_ids"][:, 0] % 3).astype(np.int32)
        yield batch
        k += 1


def bert_loss(model, batch, rngs):
    logits = F.forward(model, batch).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), {}


def fit_bert(workdir, shape, preset, devices, num_steps=4, seed=0, **overrides):
    config = w.make_config(num_steps=num_steps, sharding=preset, **overrides)
    mesh = sharding.make_mesh(shape, devices)
    return train.fit(_tiny.tiny_bert(seed=seed, vocab=128), bert_loss, bert_batches, config=config,
                     workdir=workdir, mesh=mesh)


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def flat(model):
    return {tree.path_str(p): np.asarray(x) for p, x in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def kernel(model, layer=0, site="attention.query"):
    return dict(tree.named_leaves(nnx.state(model, nnx.Param)))[f"bert.encoder.layers.{layer}.{site}.kernel"]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """``(losses, params)`` of the reference run on one device."""
    model, history = fit_bert(tmp_path_factory.mktemp("one"), {"data": 1, "model": 1}, "replicated",
                              jax.devices()[:1])
    return losses(history), flat(model)


@needs(8)
@pytest.mark.parametrize("n, shape, preset", [
    (4, {"data": 2, "model": 2}, "tensor"),
    (8, {"data": 4, "model": 2}, "fsdp+tensor"),
    (8, {"data": 8, "model": 1}, "fsdp"),
])
def test_multidevice_sharded_training_matches_one_device(tmp_path, one_device_run, n, shape, preset):
    many, history = fit_bert(tmp_path, shape, preset, jax.devices()[:n])
    ref_losses, ref_params = one_device_run
    np.testing.assert_allclose(losses(history), ref_losses, rtol=LOSS_RTOL)
    params = flat(many)
    for name, value in ref_params.items():
        np.testing.assert_allclose(params[name], value, atol=PARAM_ATOL, err_msg=name)
    if preset != "fsdp":  # the model's kernels are split over `model` (a shard holds half the columns)
        k = kernel(many)
        assert k.shape == (16, 16) and k.addressable_shards[0].data.shape == (16, 8)
        assert k.sharding.spec == P(None, "model")


@needs(8)
def test_multidevice_config_mesh_places_the_state(tmp_path):
    config = w.make_config(num_steps=2, mesh={"data": 4, "model": 2}, sharding="tensor")
    model, history = train.fit(_tiny.tiny_bert(vocab=128), bert_loss, bert_batches, config=config,
                               workdir=str(tmp_path))
    k = kernel(model, 1, "ffn.output")
    assert dict(k.sharding.mesh.shape) == {"data": 4, "model": 2}
    assert k.addressable_shards[0].data.shape == (12, 16) and np.isfinite(losses(history)).all()
    with pytest.raises(sharding.ShardingError, match="needs 4 devices but there are 8"):
        train.fit(_tiny.tiny_bert(), bert_loss, bert_batches, workdir=str(tmp_path / "x"),
                  config=w.make_config(mesh={"data": 2, "model": 2}))


@needs(4)
def test_multidevice_checkpoint_restores_onto_another_mesh(tmp_path):
    devices = jax.devices()[:4]
    workdir = epath.Path(tmp_path) / "run"
    saved, _ = fit_bert(workdir, {"data": 2, "model": 2}, "tensor", devices, num_steps=2,
                        checkpoint_every=2)
    assert kernel(saved).sharding.spec == P(None, "model")
    for preset in ("replicated", "fsdp"):  # another init: every value must come from the checkpoint
        restored, history = fit_bert(workdir, {"data": 4, "model": 1}, preset, devices, num_steps=2, seed=7)
        assert losses(history) == []
        for name, value in flat(saved).items():
            np.testing.assert_array_equal(flat(restored)[name], value, err_msg=name)
        embedding = dict(tree.named_leaves(nnx.state(restored, nnx.Param)))[
            "bert.embeddings.word_embeddings.embedding"]
        assert embedding.sharding.spec == (P("data") if preset == "fsdp" else P())
        assert kernel(restored).sharding.spec == P()


@pytest.mark.slow  # the fast suite also runs with 8 simulated devices, where these cases run directly
def test_multidevice_cases_in_a_subprocess():
    """Runs this file's multi-device cases on 8 simulated CPU devices (skipped when this process
    already has 8 devices: they ran directly)."""
    if jax.device_count() >= 8:
        pytest.skip("the multi-device cases ran in this process")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "multidevice and not subprocess"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    assert summary.startswith("5 passed") and "skipped" not in summary, tail
