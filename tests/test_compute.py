"""Compute accounting (`efficient_nlp.train.compute`, `.step_cost`, `.power`): XLA's FLOPs against
a hand count and the FLOPs model, the meter after a short fit, RAPL / NVML readers on fakes, the
energy estimate against a hand computation, run_recipe's compute section, and fit's ``opt_state``."""
import json
import logging
import os
import sys
import types
import weakref

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import models, recipes, train
from efficient_nlp.models.flops import head_flops, train_flops
from efficient_nlp.train import compute, power, step_cost

# A tiny masked LM: batch B of T tokens, width h, FFN I, vocabulary V, L layers of N heads (B = 8: fit
# splits a batch evenly over up to 8 devices).
B, T, H, I, V, L, N = 8, 32, 64, 128, 512, 2, 2


def tiny_mlm():
    cfg = models.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=N,
                            intermediate_size=I, max_position_embeddings=T, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    return models.BertForMaskedLM(cfg, rngs=nnx.Rngs(0))


def hand_count_forward():
    """Every matmul of the MLM forward pass, 2 m n k each (LayerNorm, softmax, GELU, biases and
    the embedding lookup are not matmuls)."""
    d, rows = H // N, B * T
    per_layer = (3 * 2 * rows * H * H          # Q, K, V projections
                 + 2 * B * N * T * T * d       # attention scores  [T,d] x [d,T] per head
                 + 2 * B * N * T * T * d       # context           [T,T] x [T,d] per head
                 + 2 * rows * H * H            # output projection
                 + 2 * rows * H * I            # FFN in
                 + 2 * rows * I * H)           # FFN out
    head = 2 * rows * H * H + 2 * rows * H * V  # MLM transform dense, tied decoder at every position
    return L * per_layer + head


def mlm_loss(model, batch, rngs):
    logits = model(batch["input_ids"], batch["attention_mask"]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"]).mean(), {}


SGD = optax.sgd(1e-2)  # one object: train.run compiles its step once for all the tests


def mlm_batches(start=0):
    rng = np.random.default_rng(start)
    while True:
        yield {"input_ids": rng.integers(0, V, (B, T)).astype(np.int32), "attention_mask": np.ones((B, T), np.int32)}


def train_config(steps, **compute_section):
    config = ml_collections.ConfigDict(dict(train=dict(
        num_steps=steps, batch_size=B, log_every=2, checkpoint_every=0, async_checkpointing=False,
        tensorboard=False, progress_bar=False, learning_rate=1e-3, warmup_ratio=0.0)))
    if compute_section:
        config.compute = compute_section
    return config


# ----------------------------------------------------------------------------- FLOPs
def test_xla_counts_two_m_n_k_for_a_matmul():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
    flops, source = step_cost.xla_flops(jax.jit(lambda a, b: a @ b).lower, (x, w))
    assert flops == 2 * 8 * 16 * 32 and source == "XLA cost analysis"


def test_xla_forward_flops_of_a_tiny_bert_agree_with_the_hand_count_and_the_flops_model():
    model = tiny_mlm()
    graphdef, state = nnx.split(model)
    ids = jnp.ones((B, T), jnp.int32)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
    xla, _ = step_cost.xla_flops(forward.lower, (state, ids))
    hand = hand_count_forward()
    # XLA counts every matmul as 2 m n k plus the elementwise work (about 12% at this width).
    assert hand <= xla <= 1.15 * hand, (xla, hand)
    # The FLOPs model counts exactly the matmuls: a training step is three forward passes.
    assert train_flops(model, T, B) == 3 * hand
    assert train_flops(model.config, T, B, lm_head=True) == 3 * hand
    assert head_flops(model.config, T, "mlm") == 2 * T * (H * H + H * V)
    assert train_flops(model.config, T, B, head=None) == 3 * (hand - B * head_flops(model.config, T, "mlm"))


def test_a_short_fit_in_a_meter_reports_flops_throughput_energy_and_their_sources(tmp_path):
    model = tiny_mlm()
    config = train_config(4, peak_flops_per_second=1e12)
    with compute.Meter(config) as meter:
        train.fit(model, mlm_loss, mlm_batches, config=config, workdir=str(tmp_path))
    s = meter.summary()
    assert json.loads(json.dumps(s)) == s  # JSON-ready
    assert (s["steps"], s["examples"], s["tokens"]) == (4, 4 * B, 4 * B * T)
    assert s["flops_source"] == "XLA cost analysis" and s["train_flops"] == pytest.approx(4 * s["flops_per_step"])
    # XLA's step = the FLOPs model's 3 x forward + elementwise work and the AdamW update.
    assert 1.0 <= s["flops_per_step"] / train_flops(model, T, B) <= 1.15
    # Rates over the same timed steps (the first step, which compiles, is not timed).
    assert s["train_seconds"] > 0 and s["steps_per_second"] > 0
    assert s["tokens_per_second"] == pytest.approx(T * s["examples_per_second"])
    assert s["flops_per_second"] == pytest.approx(s["flops_per_step"] * s["steps_per_second"])
    assert s["device"]["count"] == jax.device_count()         # fit's step runs on every device
    assert s["mfu"] == pytest.approx(s["flops_per_second"] / (jax.device_count() * 1e12))
    assert s["device"]["peak_source"] == "config.compute.peak_flops_per_second"
    # Energy: positive, CO2 = E x 0.433, each part named.
    assert s["energy_kwh"] > 0 and s["co2_kg"] == pytest.approx(0.433 * s["energy_kwh"])
    assert s["power_watts"]["cpu"] > 0 and s["power_watts"]["dram"] > 0
    assert s["power_sources"]["cpu"].startswith(("measured: RAPL", "estimated: "))
    if s["power_sources"]["cpu"].startswith("estimated"):
        assert "W/core TDP x" in s["power_sources"]["cpu"] and "% utilisation" in s["power_sources"]["cpu"]
    assert s["power_sources"]["gpu"].startswith("none")  # CPU devices
    assert "Strubell" in s["assumptions"]["pue"]["source"] and s["pue"] == 1.58
    assert "Strubell" in s["assumptions"]["carbon_intensity_kg_per_kwh"]["source"]
    line = compute.format_summary(s)
    assert line.startswith("compute: 4 steps,") and "(XLA cost analysis)" in line and "MFU " in line
    assert "\nenergy: " in line and "kg CO2" in line and s["power_sources"]["cpu"] in line


def test_nested_meters_both_count_and_mfu_is_unknown_on_cpu():
    model = tiny_mlm()
    with compute.Meter() as outer:
        train.run(model, mlm_loss, SGD, mlm_batches(), steps=2)
        with compute.Meter() as inner:
            train.run(model, mlm_loss, SGD, mlm_batches(), steps=3)
        assert step_cost.current_meters() == (outer,)
    o, i = outer.summary(), inner.summary()
    assert (o["steps"], i["steps"]) == (5, 3)
    assert i["flops_per_step"] == o["flops_per_step"] and i["flops_source"] == "XLA cost analysis"
    assert 1.0 <= i["flops_per_step"] / train_flops(model, T, B) <= 1.15
    assert i["mfu"] is None and "peak FLOP/s of cpu devices unknown" in i["mfu_note"]


def test_without_xla_analysis_the_flops_model_is_used(monkeypatch):
    monkeypatch.setattr(step_cost, "xla_flops", lambda *a, **k: (None, "not available"))
    monkeypatch.setattr(step_cost, "_FLOPS_CACHE", weakref.WeakKeyDictionary())  # forget earlier analyses
    model = tiny_mlm()
    with compute.Meter() as meter:
        train.run(model, mlm_loss, SGD, mlm_batches(), steps=2)
    s = meter.summary()
    assert s["flops_per_step"] == train_flops(model, T, B) and s["flops_source"].startswith("FLOPs model")


# ----------------------------------------------------------------------------- energy
def _zone(root, name, label, energy, max_range=10_000):
    d = root / name
    d.mkdir()
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return d


def fake_powercap(root):
    root.mkdir(exist_ok=True)
    pkg = _zone(root, "intel-rapl:0", "package-0", 1_000)
    _zone(root, "intel-rapl:0:0", "core", 400)           # inside the package: not added
    dram = _zone(root, "intel-rapl:0:1", "dram", 500)
    _zone(root, "intel-rapl:1", "psys", 7_000)            # the whole platform: not added
    (root / "intel-rapl").mkdir()                         # the control type directory
    return pkg, dram


def test_rapl_reader_parses_a_powercap_tree_and_survives_a_wrap(tmp_path):
    assert power.rapl_delta_uj(9_000, 2_000, 10_000) == 3_000 and power.rapl_delta_uj(10, 25, 100) == 15
    pkg, dram = fake_powercap(tmp_path / "powercap")
    reader = power.RaplReader(str(tmp_path / "powercap"))
    assert reader.available and reader.parts() == {"package", "dram"}
    (pkg / "energy_uj").write_text("9000\n")
    (dram / "energy_uj").write_text("700\n")
    reader.sample()
    (pkg / "energy_uj").write_text("2000\n")              # wrapped after 10 000 uJ
    reader.sample()
    assert reader.joules["package"] == pytest.approx((8_000 + 3_000) * 1e-6)
    assert reader.joules["dram"] == pytest.approx(200 * 1e-6)


def test_an_unreadable_or_missing_rapl_tree_falls_back(tmp_path):
    root = tmp_path / "powercap"
    root.mkdir()
    d = root / "intel-rapl:0"
    d.mkdir()
    (d / "name").write_text("package-0\n")
    (d / "max_energy_range_uj").write_text("10000\n")
    (d / "energy_uj").mkdir()                             # reading it fails
    reader = power.RaplReader(str(root))
    assert not reader.available and "not readable" in reader.problem
    missing = power.RaplReader(str(tmp_path / "absent"))
    assert not missing.available and missing.problem == "no RAPL counters on this machine"


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for the energy accounting: ``clock.t`` seconds."""
    c = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(power, "_now", lambda: c.t)
    return c


def test_the_estimate_matches_a_hand_computation(monkeypatch, clock, tmp_path):
    assert power.estimate_cpu_watts(3.0, 2.0, 4, 12.0) == (18.0, 0.375)
    assert power.estimate_cpu_watts(10.0, 1.0, 2, 12.0) == (24.0, 1.0)   # utilisation at most 1
    assert power.estimate_memory_watts(2e9, 0.3725) == pytest.approx(0.745)
    assert power.energy_kwh(3.6e6, 1.58) == pytest.approx(1.58)
    cpu = iter([100.0, 103.0])
    monkeypatch.setattr(power, "_cpu_seconds", lambda: next(cpu))
    monkeypatch.setattr(power, "_cores", lambda: 4)
    monkeypatch.setattr(power, "_peak_rss_bytes", lambda: 2e9)
    with compute.Meter(rapl_root=str(tmp_path / "absent")) as meter:
        clock.t = 2.0                                     # 3 CPU seconds in 2 s on 4 cores
    s = meter.summary()
    p_cpu, p_dram = 12.0 * 4 * (3.0 / (2.0 * 4)), 0.3725 * 2.0  # 18 W, 0.745 W
    assert s["power_watts"] == pytest.approx({"cpu": p_cpu, "dram": p_dram, "gpu": 0.0})
    assert s["energy_kwh"] == pytest.approx(1.58 * (p_cpu + p_dram) * 2.0 / 3.6e6)
    assert s["co2_kg"] == pytest.approx(0.433 * s["energy_kwh"])
    assert s["power_sources"]["cpu"] == ("estimated: 4 cores x 12 W/core TDP x 38% utilisation "
                                         "(no RAPL counters on this machine)")
    assert s["power_sources"]["dram"] == "estimated: 0.3725 W/GB x 2.00 GB peak resident memory of the process"
    assert s["steps"] == 0 and s["mfu"] is None and s["flops_note"] == "no training step ran"


def test_measured_rapl_energy_and_configured_assumptions(clock, tmp_path):
    pkg, dram = fake_powercap(tmp_path / "powercap")
    config = ml_collections.ConfigDict({"compute": {"pue": 1.1, "carbon_intensity_kg_per_kwh": 0.1}})
    with compute.Meter(config, rapl_root=str(tmp_path / "powercap")) as meter:
        (pkg / "energy_uj").write_text("9000\n")          # +8000 uJ
        (dram / "energy_uj").write_text("2500\n")          # +2000 uJ
        clock.t = 4.0
    s = meter.summary()
    assert s["power_sources"]["cpu"] == "measured: RAPL package counters (whole machine)"
    assert s["power_sources"]["dram"] == "measured: RAPL dram counters (whole machine)"
    assert s["power_watts"]["cpu"] == pytest.approx(8_000e-6 / 4) and s["power_watts"]["dram"] == pytest.approx(2_000e-6 / 4)
    assert s["energy_kwh"] == pytest.approx(1.1 * 10_000e-6 / 3.6e6) and s["co2_kg"] == pytest.approx(0.1 * s["energy_kwh"])
    assert s["assumptions"]["pue"] == {"value": 1.1, "source": "config.compute.pue"}


class FakeNvml:
    """Two GPUs: each reading of GPU g's energy counter adds (1 + 2 g) J; their power is 100 W
    and 150 W.  ``counter=False``: a GPU without the energy counter."""

    def __init__(self, counter=True):
        self.counter, self.mj = counter, [0, 0]

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise RuntimeError("not supported")
        self.mj[h] += (1 + 2 * h) * 1000
        return self.mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return 100_000 + 50_000 * h                       # mW


class NoNvml:
    def nvmlInit(self):
        raise OSError("NVML Shared Library Not Found")


def test_nvml_reader_counts_energy_counters_or_integrates_power(monkeypatch, clock):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    reader = power.NvmlReader(FakeNvml())
    assert reader.available and reader.counter and reader.names == ["NVIDIA H100 80GB HBM3"] * 2
    reader.sample()
    assert reader.joules == pytest.approx(1.0 + 3.0)
    sampled = power.NvmlReader(FakeNvml(counter=False))
    assert sampled.available and not sampled.counter
    clock.t = 2.0
    sampled.sample()                                      # 100 W + 150 W for 2 s
    assert sampled.joules == pytest.approx(500.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert power.NvmlReader(FakeNvml()).handles == [1]
    missing = power.NvmlReader(NoNvml())
    assert not missing.available and "NVML Shared Library Not Found" in missing.problem


def test_device_table_and_config_errors():
    assert compute.device_spec("NVIDIA H100 80GB HBM3").peak_flops_per_second == 989e12
    assert compute.device_spec("NVIDIA H100 PCIe").peak_flops_per_second == 756e12
    assert compute.device_spec("NVIDIA H200").tdp_watts == 700
    assert compute.device_spec("NVIDIA A100-SXM4-80GB").peak_flops_per_second == 312e12
    assert compute.device_spec("TPU v5 lite").peak_flops_per_second == 197e12
    assert compute.device_spec("TPU v5").peak_flops_per_second == 459e12
    assert compute.device_spec("NVIDIA L4").peak_flops_per_second == 121e12
    assert compute.device_spec("NVIDIA L40S") is None and compute.device_spec("cpu") is None
    with pytest.raises(ValueError, match=r"config.compute.pue must be a finite number >= 1"):
        compute.compute_options({"compute": {"pue": 0.5}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pue_factor'\] in config.compute"):
        compute.compute_options({"compute": {"pue_factor": 2}})
    assert compute.compute_options(None) == compute.ComputeOptions()


# ----------------------------------------------------------------------------- run_recipe
@pytest.fixture
def fake_recipe(monkeypatch):
    """Registers recipe ``_compute_test``: 3 steps of train.run, then writes results.json as the
    config says; returns the module so a test can change ``returns``."""
    module = types.ModuleType("_compute_test_recipe")
    module.returns = {"accuracy": 0.5}

    def run(config, workdir):
        model = tiny_mlm()
        train.run(model, mlm_loss, SGD, mlm_batches(), steps=3)
        if module.returns is not None:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "results.json"), "w") as f:
                json.dump(module.returns, f)
        return None if module.returns is None else dict(module.returns)

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(recipes.RECIPES, "_compute_test", module.__name__)
    return module


def test_run_recipe_adds_compute_to_the_results_and_results_json(fake_recipe, tmp_path, capsys):
    config = ml_collections.ConfigDict({"recipe": "_compute_test"})
    results = recipes.run_recipe(config, str(tmp_path))
    saved = json.load(open(tmp_path / "results.json"))
    assert saved == results and saved["accuracy"] == 0.5
    assert saved["compute"]["steps"] == 3 and saved["compute"]["flops_source"] == "XLA cost analysis"
    assert saved["compute"]["energy_kwh"] > 0
    assert "compute: 3 steps," in capsys.readouterr().out


def test_a_recipe_returning_none_still_prints_its_compute_and_old_files_are_kept(fake_recipe, tmp_path, capsys):
    old = {"from": "an earlier run"}
    (tmp_path / "results.json").write_text(json.dumps(old))
    os.utime(tmp_path / "results.json", (1e9, 1e9))       # written long before this run
    fake_recipe.returns = None
    assert recipes.run_recipe(ml_collections.ConfigDict({"recipe": "_compute_test"}), str(tmp_path)) is None
    assert "compute: 3 steps," in capsys.readouterr().out
    assert json.load(open(tmp_path / "results.json")) == old
    fake_recipe.returns = {"accuracy": 0.5}
    config = ml_collections.ConfigDict({"recipe": "_compute_test", "compute": {"enabled": False}})
    assert recipes.run_recipe(config, str(tmp_path)) == {"accuracy": 0.5}
    assert "compute:" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_a_tiny_finetune_recipe_gets_a_compute_section(make_tiny_model_dir, tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import quickstart
    model_dir = make_tiny_model_dir("tiny_bert_compute", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64)
    config = quickstart.get_config()
    config.model_dir = model_dir
    config.data.update(max_train_examples=64, max_length=16)
    config.train.update(num_steps=4, batch_size=8, eval_every=0, checkpoint_every=0, log_every=2,
                        async_checkpointing=False, tensorboard=False, progress_bar=False)
    results = recipes.run_recipe(config, str(tmp_path))
    saved = json.load(open(tmp_path / "results.json"))
    assert saved == results and "dev_after" in saved
    assert saved["compute"]["steps"] == 4 and saved["compute"]["examples"] == 32
    assert saved["compute"]["tokens"] == 4 * 8 * 16 and saved["compute"]["flops_source"] == "XLA cost analysis"


# ----------------------------------------------------------------------------- fit(opt_state=...)
class TwoLayers(nnx.Module):
    """A small regression model (fit's optimizer state does not depend on the architecture)."""

    def __init__(self, width=8, depth=2, seed=0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([nnx.Linear(4 if i == 0 else width, width, rngs=rngs) for i in range(depth)])
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.out(x)[:, 0]


def mse_loss(model, batch, rngs):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def regression_batches(start=0):
    rng = np.random.default_rng(start)
    for _ in range(start, 10**6):
        x = rng.normal(size=(8, 4)).astype(np.float32)   # 8 rows: fit splits them over up to 8 devices
        yield {"x": x, "y": x.sum(1)}


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_fit_starts_from_a_given_optimizer_state(tmp_path, caplog):
    config = train_config(3)
    model = TwoLayers()
    params = nnx.state(model, nnx.Param)
    tx = train.make_optimizer(train.train_options(config), 3)

    def fit(workdir, opt_state=None):
        return train.fit(model, mse_loss, regression_batches, config=config, workdir=str(tmp_path / workdir),
                         optimizer=tx, opt_state=opt_state)[0]

    plain, same = fit("a"), fit("b", tx.init(params))
    for x, y in zip(params_of(plain), params_of(same)):
        np.testing.assert_array_equal(x, y)
    # Moments that are not zero change the updates: the given state is the one used.
    moved = jax.tree.map(lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, tx.init(params))
    assert any(not np.array_equal(x, y) for x, y in zip(params_of(plain), params_of(fit("c", moved))))
    # Resuming: the checkpoint's optimizer state wins, with a log line.
    with caplog.at_level(logging.INFO, logger="efficient_nlp.train.loop"):
        again = fit("a", moved)
    assert "opt_state ignored: resumed from the checkpoint of step 3" in caplog.text
    for x, y in zip(params_of(plain), params_of(again)):
        np.testing.assert_array_equal(x, y)


def test_an_optimizer_state_of_another_structure_raises(tmp_path):
    config = train_config(2)
    model = TwoLayers(depth=2)
    tx = train.make_optimizer(train.train_options(config), 2)

    def fit(opt_state):
        train.fit(model, mse_loss, regression_batches, config=config, workdir=str(tmp_path), optimizer=tx,
                  opt_state=opt_state)

    with pytest.raises(ValueError, match=r"opt_state does not match the optimizer's state: unexpected leaf "
                                         r".*'layers'\]\[2\].* \(and 3 more\)"):
        fit(tx.init(nnx.state(TwoLayers(depth=3), nnx.Param)))    # a layer too many: kernel, bias in mu, nu
    with pytest.raises(ValueError, match=r"leaf .*'layers'\]\[0\]\['bias'\].* is float32\[6\], "
                                         r"the optimizer's is float32\[8\]"):
        fit(tx.init(nnx.state(TwoLayers(width=6), nnx.Param)))
    with pytest.raises(ValueError, match=r"it has no leaf"):
        fit(optax.sgd(0.1).init(nnx.state(model, nnx.Param)))   # another optimizer: no moments
    assert not os.path.exists(tmp_path / "checkpoints")
