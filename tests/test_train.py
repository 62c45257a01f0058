"""Tests of efficient_nlp.train: optimizer, loop, resume, checkpoints, metrics, devices.

The loop is model-agnostic; these tests use the tiny NNX classifier of
tests/_train_worker.py on synthetic token data. The 4-device run (started first, in the
background) and the two-process multi-host run happen in subprocesses, so this process
keeps its single CPU device.
"""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import _train_worker as w  # noqa: E402
from efficient_nlp import train  # noqa: E402

WORKER = os.path.join(HERE, "_train_worker.py")
SUBPROCESS_TIMEOUT = 120


# ---------------------------------------------------------------------------------------
# Subprocesses (4 simulated devices; two processes on 127.0.0.1).
# ---------------------------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _start(args, env):
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc, what):
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {SUBPROCESS_TIMEOUT}s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{what} failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """The 4-simulated-device run, started before the in-process tests (overlaps them)."""
    base = tmp_path_factory.mktemp("devices")
    proc = _start(["devices", str(base / "run")],
                  _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def _start_device_run_first(device_run):
    return device_run


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Single-process run of the subprocesses' configuration on this process's devices."""
    model, history = run_fit(tmp_path_factory.mktemp("reference") / "run",
                             **w.SUBPROCESS_CONFIG)
    return [r["loss"] for r in train_records(history)], w.flat_params(model)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def run_fit(workdir, batches=None, model=None, eval_fn=None, **overrides):
    config = w.make_config(**overrides)
    return train.fit(model or w.make_model(), w.loss_fn, batches or w.make_batches(8),
                     config=config, workdir=str(workdir), eval_fn=eval_fn)


def dev_accuracy_fn():
    data = w.make_data(seed=123, index=0, batch_size=256)

    @jax.jit
    def predict(model, ids):
        return jnp.argmax(model(ids), -1)

    def eval_fn(model):
        pred = np.asarray(predict(model, data["ids"]))
        return {"accuracy": float(np.mean(pred == data["labels"]))}
    return eval_fn


def train_records(history):
    return [h for h in history if "loss" in h]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A workdir whose latest checkpoint is step 4 (kept unmodified; tests copy it)."""
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    run_fit(workdir, num_steps=4, checkpoint_every=2)
    return workdir


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------
def test_schedule_warmup_then_linear_decay():
    config = w.make_config(learning_rate=1.0, warmup_ratio=0.1)
    schedule = train.make_lr_schedule(config, 100)
    got = [float(schedule(c)) for c in (0, 5, 10, 55, 99, 100, 150)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 1 / 90, 0.0, 0.0], atol=1e-6)
    # warmup_ratio 0: full rate at the first update, linear to 0.
    flat = train.make_lr_schedule(w.make_config(learning_rate=2.0, warmup_ratio=0.0), 10)
    np.testing.assert_allclose([float(flat(c)) for c in (0, 5, 10)], [2.0, 1.0, 0.0])


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(4, rngs=rngs)
        self.LayerNorm.extra = nnx.Param(jnp.ones((4, 4)))  # 2-D but under 'LayerNorm'
        self.layer_norm_proj = nnx.Param(jnp.ones((4, 4)))  # name holds 'layer_norm'
        self.attn_bias_table = nnx.Param(jnp.ones((3, 4)))  # name holds 'bias'
        self.gate = nnx.Param(jnp.ones((4,)))  # ndim 1
        self.emb = nnx.Embed(5, 4, rngs=rngs)


def test_weight_decay_mask_excludes_biases_and_layernorm():
    params = nnx.state(_Block(nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(train.weight_decay_mask(params))
    assert mask["dense"]["kernel"] is True
    assert mask["emb"]["embedding"] is True
    assert mask["dense"]["bias"] is False
    assert mask["LayerNorm"]["scale"] is False and mask["LayerNorm"]["bias"] is False
    assert mask["LayerNorm"]["extra"] is False
    assert mask["layer_norm_proj"] is False
    assert mask["attn_bias_table"] is False
    assert mask["gate"] is False

    # The optimizer applies it: with zero gradients only the decayed leaves move.
    config = w.make_config(learning_rate=0.1, warmup_ratio=0.0, weight_decay=0.5,
                           grad_clip=1.0)
    tx = train.make_optimizer(config, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zeros, params)
    moved = nnx.to_pure_dict(jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates))
    assert moved == mask
    np.testing.assert_allclose(  # decoupled decay: -lr * wd * w
        nnx.to_pure_dict(updates)["dense"]["kernel"],
        -0.1 * 0.5 * nnx.to_pure_dict(params)["dense"]["kernel"], rtol=1e-6)


QUANTIZER_MODULES = {"weight_quant", "input_quant", "matmul_quant"}


@pytest.mark.parametrize("spec", [dict(w_bits=4, e_bits=4, a_bits=8, weight_method="lsq", activation_method="lsq"),
                                  dict(w_bits=4, e_bits=4, a_bits=8, weight_method="lsq", weight_group_size=8,
                                       activation_method="pact")])
def test_weight_decay_mask_excludes_quantizer_state(spec):
    from _tiny import tiny_bert
    from efficient_nlp import quant
    from efficient_nlp.tree import path_str

    qmodel, _ = quant.quantize_model(tiny_bert(), quant.make_spec(**spec))
    params = nnx.state(qmodel, nnx.Param)
    mask = train.weight_decay_mask(params)
    leaves = {path_str(p): (leaf, m) for (p, leaf), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                                             jax.tree.leaves(mask))}
    quantizer = {k: v for k, v in leaves.items() if QUANTIZER_MODULES.intersection(k.split("."))}
    # Per-channel ([1, d_out], rows [V, 1]) and group-wise ([d_in / g, 1, d_out]) steps: the
    # old mask (ndim <= 1, bias, norm) decayed these.
    assert any(jnp.ndim(leaf) >= 2 for leaf, _ in quantizer.values())
    assert any(k.endswith((".q.step", ".probs.offset", ".probs.lo")) for k in quantizer)
    assert not any(m for _, m in quantizer.values()), [k for k, (_, m) in quantizer.items() if m]
    weights = [k for k in leaves if k.endswith((".kernel", ".embedding"))]
    assert weights and all(leaves[k][1] for k in weights)

    # AdamW with weight decay and zero gradients: the quantizer state does not move.
    config = w.make_config(learning_rate=0.1, warmup_ratio=0.0, weight_decay=0.5, grad_clip=1.0)
    tx = train.make_optimizer(config, 10)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(jax.tree.map(jnp.zeros_like, params), params)
    new = {path_str(p): leaf for p, leaf in
           jax.tree_util.tree_flatten_with_path(optax.apply_updates(params, updates))[0]}
    for k, (leaf, _) in quantizer.items():
        np.testing.assert_array_equal(new[k], leaf, err_msg=k)
    assert not np.array_equal(new[weights[0]], leaves[weights[0]][0])


class _Controls(nnx.Module):
    """Learned values that are not weights, as the library names them."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.stem_bn = nnx.Module()
        self.stem_bn.scale = nnx.Param(jnp.ones((3, 4)))      # per-candidate batch-norm gains (NAS)
        self.head_gates = nnx.List([nnx.Param(jnp.ones((2, 2)))])  # pruning gates
        self.retention = nnx.Param(jnp.ones((2, 8)))            # token-skipping retention [L, T]
        self.split = nnx.Module()                                 # a split layer's second quantizer
        self.split.weight_quant2 = nnx.Module()
        self.split.weight_quant2.alpha = nnx.Param(jnp.ones((1, 4)))


def test_weight_decay_mask_excludes_norm_gains_gates_and_token_controls():
    mask = nnx.to_pure_dict(train.weight_decay_mask(nnx.state(_Controls(nnx.Rngs(0)), nnx.Param)))
    assert mask["dense"]["kernel"] is True
    assert mask["stem_bn"]["scale"] is False
    assert mask["head_gates"][0] is False
    assert mask["retention"] is False
    assert mask["split"]["weight_quant2"]["alpha"] is False


# ---------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------
def test_training_reduces_loss_and_logs_metrics(tmp_path):
    eval_fn = dev_accuracy_fn()
    model = w.make_model()
    before = eval_fn(model)["accuracy"]
    params_before = w.flat_params(model)
    trained, history = run_fit(tmp_path, model=model, eval_fn=eval_fn, num_steps=60,
                               batch_size=32, log_every=10, eval_every=25,
                               learning_rate=3e-2, tensorboard=True)
    records = train_records(history)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], records
    after = eval_fn(trained)["accuracy"]
    assert after > max(before, 0.5) + 0.15, (before, after)
    # The caller's model is not modified; the returned one is trained.
    for name, value in w.flat_params(model).items():
        np.testing.assert_array_equal(value, params_before[name], err_msg=name)
    assert not np.array_equal(w.flat_params(trained)["classifier/kernel"],
                              params_before["classifier/kernel"])

    evals = [h for h in history if any(k.startswith("eval/") for k in h)]
    assert [e["step"] for e in evals] == [25, 50, 60]
    assert evals[-1]["eval/accuracy"] == pytest.approx(after)
    for key in ("loss", "grad_norm", "accuracy", "lr", "steps_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    # lr logged at step t is the schedule's value for update t (count t - 1).
    schedule = train.make_lr_schedule(w.make_config(learning_rate=3e-2), 60)
    assert records[1]["lr"] == pytest.approx(float(schedule(19)))

    lines = train.read_metrics(str(tmp_path))
    assert lines == history  # one JSON object per logged dict, same values
    assert glob.glob(str(tmp_path / "events.out.tfevents.*")), "no TensorBoard events"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["60"]


def test_resume_after_interruption_is_identical(tmp_path):
    # Run A: 20 steps straight.
    model_a, _ = run_fit(tmp_path / "a", num_steps=20, checkpoint_every=4)
    # Run B: same config, preempted when asking for batch 10 (after step 10; last
    # checkpoint at 8), then a fresh fit in the same workdir continues to 20.
    with pytest.raises(w.Preempted):
        run_fit(tmp_path / "b", batches=w.make_batches(8, fail_at=10), num_steps=20,
                checkpoint_every=4)
    assert train.Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [4, 8]
    model_b, history_b = run_fit(tmp_path / "b", num_steps=20, checkpoint_every=4)

    assert train_records(history_b)[0]["step"] == 9  # resumed after checkpoint 8
    params_a, params_b = w.flat_params(model_a), w.flat_params(model_b)
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)
    # Steps 9 and 10 of the interrupted run were redone: each step logged exactly once.
    steps = [r["step"] for r in train.read_metrics(str(tmp_path / "b"))]
    assert steps == list(range(1, 21))


class _Stateful(nnx.Module):
    """The tiny classifier plus non-trainable state the forward pass updates."""

    def __init__(self):
        self.inner = w.make_model()
        self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.rngs = nnx.Rngs(noise=3)  # typed PRNG key + counter in the state

    def __call__(self, ids, *, deterministic=True, rngs=None):
        self.calls[...] = self.calls[...] + 1
        noise = 1e-3 * jax.random.normal(self.rngs.noise(), ())
        return self.inner(ids, deterministic=deterministic, rngs=rngs) + noise


def test_non_trainable_state_is_updated_and_checkpointed(tmp_path):
    model, _ = run_fit(tmp_path, model=_Stateful(), num_steps=3)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    assert int(state["calls"]) == 3 and int(state["rngs"]["noise"]["count"]) == 3
    resumed, history = run_fit(tmp_path, model=_Stateful(), num_steps=5)
    assert train_records(history)[0]["step"] == 4  # restored from step 3
    state = nnx.to_pure_dict(nnx.state(resumed, nnx.Not(nnx.Param)))
    assert int(state["calls"]) == 5 and int(state["rngs"]["noise"]["count"]) == 5


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    batches = w.make_batches(8, poison_step=3)
    with pytest.raises(train.NonFiniteLossError, match=r"step 3\b") as info:
        run_fit(tmp_path, batches=batches, num_steps=10, log_every=5, checkpoint_every=2)
    assert info.value.step == 3
    ckpt = train.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]  # step 4's (NaN) state was not saved
    assert [r["step"] for r in train.read_metrics(str(tmp_path))] == []
    # The last good checkpoint restores to finite parameters.
    model, _ = run_fit(tmp_path, num_steps=2)
    assert all(np.all(np.isfinite(v)) for v in w.flat_params(model).values())


def _corrupt(step_dir, how):
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                  recursive=True) if os.path.isfile(p)]
    assert files, os.listdir(step_dir)
    for path in files:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:  # flip bytes in the middle of every data file
            mid = len(data) // 2
            data[mid - 8: mid + 8] = bytes(b ^ 0x5A for b in data[mid - 8: mid + 8])
        with open(path, "wb") as f:
            f.write(bytes(data))


# orbax's restore can leave an asyncio callback behind when tensorstore fails mid-read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_corrupted_checkpoint_raises_clear_error(checkpointed, tmp_path, how):
    # The only checkpoint is corrupt (the fallback to an older one: test_train_faults.py).
    workdir = copy_run(checkpointed, tmp_path / "run")
    shutil.rmtree(os.path.join(str(workdir), "checkpoints", "2"))
    step_dir = os.path.join(str(workdir), "checkpoints", "4")
    _corrupt(step_dir, how)
    with pytest.raises(train.CorruptCheckpointError) as info:
        run_fit(workdir, num_steps=6)
    aside = os.path.join(str(workdir), "checkpoints_corrupt", "4")
    assert aside in str(info.value) and info.value.step_dir == os.path.dirname(step_dir)
    assert ("checksum" in str(info.value)) or ("reading the arrays failed" in str(info.value))
    # Nothing was trained or saved; the bad checkpoint was moved aside, not deleted.
    assert train.Checkpointer(os.path.dirname(step_dir)).all_steps() == []
    assert os.path.isdir(os.path.join(aside, "state"))


def test_garbled_manifest_raises_clear_error(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    shutil.rmtree(os.path.join(str(workdir), "checkpoints", "2"))
    step_dir = os.path.join(str(workdir), "checkpoints", "4")
    for path in glob.glob(os.path.join(step_dir, "manifest", "*")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(train.CorruptCheckpointError, match="manifest") as info:
        run_fit(workdir, num_steps=6)
    assert info.value.step_dir == os.path.dirname(step_dir)


def test_incompatible_checkpoint_raises_clear_error(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    step_dir = os.path.join(str(workdir), "checkpoints", "4")
    with pytest.raises(train.IncompatibleCheckpointError) as info:
        run_fit(workdir, model=w.make_model(dim=24), num_steps=6)
    message = str(info.value)
    assert step_dir in message
    assert "params/embed/embedding: checkpoint [32, 16] float32 vs target [32, 24]" in message


def test_resume_false_refuses_existing_checkpoints(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    with pytest.raises(ValueError, match="resume is False"):
        run_fit(workdir, num_steps=6, resume=False)


# ---------------------------------------------------------------------------------------
# Devices and hosts
# ---------------------------------------------------------------------------------------
def test_four_devices_match_one_device(device_run, reference_run):
    # the reference ran on this process's devices (one by default, 8 under the CI's 8-device pass):
    # data parallelism over 4 devices must match it either way
    result = _result(device_run, "4-device run")
    assert result["device_count"] == 4
    losses, params = reference_run
    assert result["steps"] == [1, 2, 3, 4]
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5, atol=1e-6)
    for name, value in params.items():
        np.testing.assert_allclose(result["params"][name], value, rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_two_process_multihost_matches_single_process(reference_run, tmp_path):
    port = _free_port()
    workdir = str(tmp_path / "run")
    procs = [_start(["multihost", workdir, str(port), str(pid), "2"], _env())
             for pid in range(2)]
    try:
        results = [_result(p, f"multi-host process {i}") for i, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["device_count"] == 2 for r in results)
    losses, params = reference_run
    for r in results:  # each process fed half of every batch
        assert r["steps"] == [1, 2, 3, 4]
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5, atol=1e-6)
        for name, value in params.items():
            np.testing.assert_allclose(r["params"][name], value, rtol=1e-4, atol=1e-6,
                                       err_msg=name)
    # Only process 0 wrote metrics; both took part in the checkpoints.
    assert [m["step"] for m in train.read_metrics(workdir)] == [1, 2, 3, 4]
    assert train.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]
