"""MREM-P (docs/quantization.md): queues, teacher forcing, module-local gradients, placement, quality.

The 4-device comparison runs in this process when it has at least 4 devices (e.g. under
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), else in a subprocess with 4 simulated
CPU devices (this file run as a script: ``python tests/test_mrem_p.py devices``), started before
the in-process tests so that it overlaps them.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from test_ptq import flat, tiny_split, tiny_teacher  # noqa: E402
from efficient_nlp import quant  # noqa: E402
from efficient_nlp.quant import mrem, ptq  # noqa: E402
from efficient_nlp.quant.mrem_parallel import (forcing_lambda, module_slice, mrem_p, place, queue_init,  # noqa: E402
                                        queue_push, queue_sample, teacher_force)

SUBPROCESS_TIMEOUT = 600  # the shared 2-core machine: compiles of 8 module steps dominate


def quantized_448(teacher, calib):
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(4, 4, 8, activation_method="lsq"))
    quant.calibrate(qmodel, {k: v[:16] for k, v in calib.items()})
    return qmodel


def compare_methods(steps=40):
    """MREM-S and MREM-P (module n on local device n) on a tiny 4-layer model, 4 modules, same seeds."""
    teacher, calib = tiny_teacher(layers=4), tiny_split(n=64)
    qmodel = quantized_448(teacher, calib)
    kw = dict(num_modules=4, steps=steps, learning_rate=1e-4, batch_size=16, log=None)
    s = mrem.mrem_s(qmodel, teacher, calib, **kw).model
    p, report, info = mrem_p(qmodel, teacher, calib, queue_size=4, **kw)
    return dict(info=info, init=ptq.layer_errors(qmodel, teacher, calib), mrem_s=ptq.layer_errors(s, teacher, calib),
                mrem_p=ptq.layer_errors(p, teacher, calib), devices=[r["device"] for r in report])


@pytest.fixture(scope="module")
def device_run():
    """None when this process has 4 devices, else the started 4-device subprocess."""
    if jax.local_device_count() >= 4:
        yield None
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "devices"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_queue_is_fifo_with_the_configured_staleness(device_run):
    push, sample = jax.jit(queue_push), jax.jit(queue_sample)
    queue = queue_init(4, {"x": jnp.zeros((3,), jnp.int32)})
    for c in range(1, 11):
        queue = push(queue, {"x": jnp.full((3,), c - 1)})
        held = sorted(int(v) for v in queue["items"]["x"][: min(c, 4), 0])
        assert held == list(range(max(0, c - 4), c))          # exactly the last t0 = 4 outputs
        assert int(queue["items"]["x"][(c - 1) % 4, 0]) == c - 1  # newest in slot (c-1) mod t0
    assert int(queue["count"]) == 10
    # sampling: rows drawn with replacement, only from the filled slots, every filled slot reachable
    seen = set()
    for k in range(30):
        x = np.asarray(sample(queue, jax.random.key(k))["x"])
        assert set(x.tolist()) <= {6, 7, 8, 9}
        seen |= set(x.tolist())
    assert seen == {6, 7, 8, 9}
    partly = push(push(queue_init(4, {"x": jnp.zeros((3,), jnp.int32)}), {"x": jnp.full((3,), 5)}),
                  {"x": jnp.full((3,), 7)})
    draws = np.concatenate([np.asarray(sample(partly, jax.random.key(k))["x"]) for k in range(20)])
    assert set(draws.tolist()) == {5, 7}                       # never an empty slot
    with pytest.raises(ValueError, match="positive int"):
        queue_init(0, {"x": jnp.zeros(1)})


def test_teacher_forcing_schedule_is_annealed_linearly_to_zero_at_t0():
    lam = np.asarray(forcing_lambda(np.arange(101), 40.0))
    np.testing.assert_allclose(lam[[0, 10, 20, 30, 40, 41, 100]], [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0], atol=1e-7)
    assert np.all(np.diff(lam) <= 0)
    assert np.all(np.asarray(forcing_lambda(np.arange(5), 0.0)) == 0)   # T0 = 0: no forcing
    fp, q = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
    np.testing.assert_array_equal(teacher_force(fp, q, 1.0), fp)
    np.testing.assert_array_equal(teacher_force(fp, q, 0.0), q)
    np.testing.assert_allclose(teacher_force(fp, q, 0.25), 0.25 * 2.0 + 0.75 * -1.0)


def test_gradients_do_not_cross_module_boundaries():
    """Module 1's loss on the teacher-forced output of module 0: zero gradient for every
    module-0 parameter (exactly), non-zero for module 1's."""
    teacher, calib = tiny_teacher(layers=2), tiny_split(n=8)
    qmodel = quantized_448(teacher, calib)
    first, second = mrem.modules(2, 2)
    names = ptq.trainable_names(qmodel, first.prefixes(qmodel) + second.prefixes(qmodel), root="q")
    graphdef, params, rest = nnx.split(ptq.Pair(qmodel, teacher), ptq.name_filter(names), ...)
    batch = {k: jnp.asarray(v) for k, v in calib.items() if k != "labels"}

    def loss(p):
        pair = nnx.merge(graphdef, p, rest)
        _, q_out, fp_out = mrem.compare(pair, first, batch)
        feed = {**batch, "fp_in": fp_out, "q_in": teacher_force(fp_out, q_out, 0.3)}
        return mrem.ModuleLoss(second)(pair, feed)[0]

    grads = {ptq.dotted(k): np.asarray(v) for k, v in nnx.to_flat_state(jax.jit(jax.grad(loss))(params))}
    own = [g for n, g in grads.items() if n.startswith("q.bert.encoder.layers.1.")]
    before = [g for n, g in grads.items() if n.startswith(("q.bert.encoder.layers.0.", "q.bert.embeddings."))]
    assert before and all(np.all(g == 0) for g in before)
    assert own and sum(float(np.abs(g).sum()) for g in own) > 0


def test_module_slice_runs_exactly_like_the_full_model():
    teacher, calib = tiny_teacher(layers=3), tiny_split(n=8)
    qmodel = quantized_448(teacher, calib)
    batch = {k: jnp.asarray(v) for k, v in calib.items() if k != "labels"}
    h = teacher.bert.embeddings(batch["input_ids"], batch["token_type_ids"])
    for mod in mrem.modules(3, 2):
        sub, local = module_slice(qmodel, mod)
        assert len(sub.bert.encoder.layers) == mod.stop - mod.start
        assert (sub.bert.embeddings is None) != mod.first and (sub.bert.pooler is None) != mod.last
        full = mrem.module_forward(qmodel, mod, batch, h)
        part = mrem.module_forward(sub, local, batch, h)
        assert full.keys() == part.keys()
        for k in full:
            for a, b in zip(jax.tree.leaves(full[k]), jax.tree.leaves(part[k])):
                np.testing.assert_array_equal(a, b)
        h = full["out"]


def test_fewer_devices_than_modules_share_them_and_say_so():
    """Three modules on at most two devices (the first two of this process: one by default,
    two under ``--xla_force_host_platform_device_count=N``): round-robin, the first device twice,
    every module trained, the input model untouched."""
    devices = jax.local_devices()[:2]
    ids = [d.id for d in devices]
    teacher, calib = tiny_teacher(layers=3), tiny_split(n=16)
    qmodel = quantized_448(teacher, calib)
    before = flat(qmodel)
    lines = []
    out, report, info = mrem_p(qmodel, teacher, calib, num_modules=3, steps=4, batch_size=8, queue_size=2,
                               devices=devices, log=lines.append)
    expected = [ids[0], ids[-1], ids[0]]
    assert info["shared_devices"] and info["devices"] == expected and [r["device"] for r in report] == expected
    assert f"fewer devices ({len(ids)}) than modules" in lines[0]
    assert flat(qmodel).keys() == before.keys() and all(np.array_equal(flat(qmodel)[k], v) for k, v in before.items())
    names = {n[len("q."):] for n in ptq.trainable_names(qmodel, ("",), root="q")}
    changed = {k for k, v in flat(out).items() if not np.array_equal(v, before[k])}
    assert changed and changed <= names, changed - names            # only latent weights / step sizes
    for i in range(3):
        assert any(k.startswith(f"bert.encoder.layers.{i}.") for k in changed), i
    assert place(4, [0, 0, 0, 0])[1] and not place(1, [0])[1]
    assert place(3, devices=devices) == ([devices[0], devices[-1], devices[0]], True)
    with pytest.raises(ValueError, match="no devices"):
        place(2, devices=[])


def test_bad_inputs_fail_clearly():
    teacher, calib = tiny_teacher(layers=2), tiny_split(n=8)
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(4, 4, 8))   # every check runs before any compute
    with pytest.raises(ValueError, match="cannot partition 2 layers into 3 modules"):
        mrem_p(qmodel, teacher, calib, num_modules=3, steps=1, log=None)
    with pytest.raises(ValueError, match="calibration set is empty"):
        mrem_p(qmodel, teacher, {k: v[:0] for k, v in calib.items()}, num_modules=2, steps=1, log=None)
    d = jax.local_device_count()
    with pytest.raises(ValueError, match=rf"needs device index {d} but only {d} device\(s\) exist"):
        mrem_p(qmodel, teacher, calib, num_modules=2, steps=1, placement=[0, d], log=None)
    with pytest.raises(ValueError, match="one device index per module"):
        place(2, [0])
    with pytest.raises(ValueError, match="queue_size"):
        mrem_p(qmodel, teacher, calib, num_modules=2, steps=1, queue_size=0, log=None)
    with pytest.raises(ValueError, match="teacher_forcing"):
        mrem_p(qmodel, teacher, calib, num_modules=2, steps=1, teacher_forcing=2.0, log=None)


def _subprocess_result(proc):
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"4-device run timed out after {SUBPROCESS_TIMEOUT}s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, err[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_mrem_p_on_4_devices_reaches_mrem_s_quality(device_run):
    r = compare_methods() if device_run is None else _subprocess_result(device_run)
    assert r["devices"] == [0, 1, 2, 3] and not r["info"]["shared_devices"]
    assert r["info"]["queue_size"] == 4 and r["info"]["anneal_steps"] == 16.0
    s, p, init = (np.asarray(r[k]) for k in ("mrem_s", "mrem_p", "init"))
    assert np.all(p != init) and np.all(s != init), r        # both trained every module
    # MREM-P's per-layer FFN-output error (end to end, vs full precision) within 10 % of MREM-S's.
    # (On this random tiny model neither lowers the error much below the calibrated start:
    # training the tiny word embedding with the straight-through gradient raises module 0's
    # loss in both; the real-model comparison is the slow test in test_ptq.py.)
    np.testing.assert_allclose(p, s, rtol=0.1, err_msg=str(r))


if __name__ == "__main__" and sys.argv[1:] == ["devices"]:
    print("RESULT " + json.dumps(compare_methods()))
