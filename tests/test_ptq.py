"""Post-training quantization (docs/quantization.md): calibration, partition, REM, MREM-S, the recipe."""
import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, quant, tree
from efficient_nlp.quant import mrem, ptq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


def tiny_teacher(layers=2, seed=0):
    cfg = models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))


def tiny_split(n=40, t=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, (n, t)).astype(np.int32)
    mask = (np.arange(t)[None] < rng.integers(4, t + 1, (n, 1))).astype(np.int32)
    return dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=np.zeros_like(ids),
                labels=rng.integers(0, 3, n).astype(np.int32))


def quantized(teacher, calib, bits=(2, 2, 8)):
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(*bits, activation_method="lsq"))
    quant.calibrate(qmodel, {k: v[:16] for k, v in calib.items()})
    return qmodel


def flat(model):
    return {tree.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def identical(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- calibration / partition
def test_calibration_set_is_seeded_of_size_k_and_records_its_rows():
    train = tiny_split(n=50)
    calib, rows = ptq.calibration_set(train, k=16, seed=3)
    again, rows2 = ptq.calibration_set(train, k=16, seed=3)
    _, other = ptq.calibration_set(train, k=16, seed=4)
    assert len(rows) == 16 == len(np.unique(rows)) and rows.min() >= 0 and rows.max() < 50
    np.testing.assert_array_equal(rows, rows2)
    assert not np.array_equal(rows, other)
    for k, v in train.items():
        np.testing.assert_array_equal(calib[k], v[rows])   # exactly those rows, nothing else
        np.testing.assert_array_equal(again[k], calib[k])
    untouched = np.setdiff1d(np.arange(50), rows)
    assert len(untouched) == 34 and not np.isin(untouched, rows).any()
    whole, all_rows = ptq.calibration_set(train, k=4096, seed=0)   # smaller split: all of it
    np.testing.assert_array_equal(all_rows, np.arange(50))


@pytest.mark.parametrize("layers,n,sizes", [(6, 4, [2, 2, 1, 1]), (12, 4, [3, 3, 3, 3]), (7, 3, [3, 2, 2]),
                                            (5, 5, [1] * 5), (3, 1, [3])])
def test_partition_covers_every_layer_exactly_once(layers, n, sizes):
    parts = ptq.partition(layers, n)
    assert [b - a for a, b in parts] == sizes
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(layers))
    mods = mrem.modules(layers, n)
    assert mods[0].first and mods[-1].last and sum(m.first for m in mods) == 1 == sum(m.last for m in mods)
    model = nnx.eval_shape(lambda: tiny_teacher(layers))
    assert "bert.embeddings." in mods[0].prefixes(model) and "classifier." in mods[-1].prefixes(model)


def test_bad_inputs_fail_clearly(make_tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="cannot partition 2 layers into 3 modules"):
        ptq.partition(2, 3)
    with pytest.raises(ValueError, match="num_modules must be a positive int"):
        ptq.partition(2, 0)
    empty = {k: v[:0] for k, v in tiny_split().items()}
    with pytest.raises(ValueError, match="calibration set is empty"):
        ptq.calibration_set(empty, k=4)
    with pytest.raises(ValueError, match="positive int"):
        ptq.calibration_set(tiny_split(), k=0)
    teacher = tiny_teacher()
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(4, 4, 8))
    with pytest.raises(ValueError, match="calibration set is empty"):
        mrem.mrem_s(qmodel, teacher, empty, num_modules=2, steps=1, log=None)
    with pytest.raises(ValueError, match="calibration set is empty"):
        ptq.rem(qmodel, teacher, empty, steps=1, log=None)
    with pytest.raises(ValueError, match="cannot partition 2 layers into 4 modules"):
        mrem.mrem_s(qmodel, teacher, tiny_split(), num_modules=4, steps=1, log=None)

    from efficient_nlp.recipes import ptq as recipe
    config = tiny_config(tiny_dir(make_tiny_model_dir))
    config.quant.rules = [[r"attention\.qurey$", None]]
    with pytest.raises(tree.RuleError, match="qurey"):
        recipe.run(config, str(tmp_path))
    config = tiny_config(tiny_dir(make_tiny_model_dir))
    config.ptq.method = "rem,mrem_q"
    with pytest.raises(ValueError, match=r"use one or more of \('rem', 'mrem_s', 'mrem_p'\)"):
        recipe.run(config, str(tmp_path))
    config = tiny_config(tiny_dir(make_tiny_model_dir), method="mrem_p")
    d = jax.local_device_count()
    config.ptq.mrem_p.placement = [0, d]
    with pytest.raises(ValueError, match=rf"needs device index {d} but only {d} device\(s\) exist"):
        recipe.run(config, str(tmp_path))
    config = tiny_config(tiny_dir(make_tiny_model_dir))
    config.ptq.qat_results = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="qat_results=.* is not a file"):
        recipe.run(config, str(tmp_path))
    config = tiny_config(tiny_dir(make_tiny_model_dir))
    config.ptq.mrem.num_modules = 3
    with pytest.raises(ValueError, match="cannot partition 2 layers into 3 modules"):
        recipe.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)   # all before any work


# ----------------------------------------------------------------------------- MREM
def test_mrem_loss_is_zero_when_quantization_is_the_identity():
    teacher = tiny_teacher()
    calib = tiny_split()
    same, report = quant.quantize_model(teacher, quant.make_spec(32, 32, 32))
    assert not report.quantized
    mod = mrem.modules(2, 1)[0]
    assert mrem.module_loss(same, teacher, mod, calib) == 0.0
    assert mrem.module_loss(quantized(teacher, calib), teacher, mod, calib) > 1e-4


def test_mrem_s_trains_only_its_module_and_reduces_its_loss():
    teacher, calib = tiny_teacher(), tiny_split()
    qmodel = quantized(teacher, calib)
    first, second = mrem.modules(2, 2)
    pair = ptq.Pair(qmodel, teacher)
    arrays = {k: calib[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    arrays.update(ptq.run_probe(pair, mrem._Boundary(first), arrays))   # module 1's two input streams
    assert not np.allclose(arrays["q_in"], arrays["fp_in"])
    before_state = flat(qmodel)
    before = mrem.module_loss(qmodel, teacher, second, arrays)
    trained, losses, count = mrem.train_module(qmodel, teacher, second, arrays, steps=40, learning_rate=1e-4,
                                               batch_size=8)
    after = mrem.module_loss(trained, teacher, second, arrays)
    assert len(losses) == 40 and after < before
    assert identical(flat(qmodel), before_state)   # the input model is untouched
    names = {n[len("q."):] for n in ptq.trainable_names(qmodel, second.prefixes(qmodel), root="q")}
    assert count == len(names) and "bert.pooler.dense.kernel" in names
    assert "bert.encoder.layers.1.attention.query.kernel" in names
    assert not any(n.startswith(("bert.encoder.layers.0.", "bert.embeddings.")) for n in names)
    assert not any(n.endswith((".bias", ".scale")) for n in names)
    changed = set()
    for name, value in flat(trained).items():
        if not np.array_equal(value, before_state[name]):
            changed.add(name)
    assert changed and changed <= names, changed - names                 # nothing outside it moved
    assert "bert.encoder.layers.1.ffn.output.kernel" in changed


# ----------------------------------------------------------------------------- REM
def test_rem_reduces_every_matmul_error():
    teacher, calib = tiny_teacher(layers=1), tiny_split()
    qmodel = quantized(teacher, calib)
    before_state = flat(qmodel)
    out, report, info = ptq.rem(qmodel, teacher, calib, steps=40, learning_rate=1e-4, token_batch_size=64, log=None)
    assert info["seconds"] > 0
    sites = [r["site"] for r in report]
    layer = ("attention.query", "attention.key", "attention.value", "attention.output", "ffn.intermediate",
             "ffn.output")
    assert sites == [f"bert.encoder.layers.0.{n}" for n in layer] + ["bert.pooler.dense"]
    for r in report:
        assert r["after"] < r["before"], r
        assert r["tokens"] == (int(calib["attention_mask"].sum()) if "pooler" not in r["site"] else 40)
    assert identical(flat(qmodel), before_state)
    moved = [n for n, v in flat(out).items() if not np.array_equal(v, before_state[n])]
    assert moved and not any(n.endswith((".bias", ".scale")) or "layer_norm" in n for n in moved)


# ----------------------------------------------------------------------------- recipe
def tiny_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_ptq_teacher", models.BertForSequenceClassification, hidden_size=16,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64, num_labels=9)


def tiny_config(teacher_dir, method="rem,mrem_s,mrem_p"):
    from configs import ptq_2_2_8
    config = ptq_2_2_8.get_config(method=method)
    config.teacher_dir = teacher_dir
    config.data.max_train_examples = 48
    config.data.max_length = 16
    config.train.eval_batch_size = 64
    config.ptq.update(dict(calibration_size=16, batch_size=8))
    config.ptq.rem.update(dict(steps=3, token_batch_size=32))
    config.ptq.mrem.update(dict(num_modules=2, steps=3))
    config.ptq.mrem_p.queue_size = 2
    return config


@pytest.mark.slow  # ~150 s wall on the shared 2-core machine (mostly XLA compiles)
def test_recipe_writes_results_layer_errors_plot_and_packed_models(make_tiny_model_dir, tmp_path, capsys):
    from efficient_nlp.recipes import ptq as recipe
    qat = {"bits": "2-2-8", "student": {"accuracy": 0.5, "loyalty": 0.6, "teacher_kl": 0.1}}
    (tmp_path / "qat.json").write_text(json.dumps(qat))
    config = tiny_config(tiny_dir(make_tiny_model_dir))
    config.ptq.qat_results = str(tmp_path / "qat.json")
    workdir = tmp_path / "run"
    results = recipe.run(config, str(workdir))
    methods = ["rem", "mrem_s", "mrem_p"]
    assert results["bits"] == "2-2-8" and results["methods"] == methods
    assert results["qat"]["metrics"] == qat["student"]
    table = capsys.readouterr().out
    assert "QAT 2-2-8 (qat recipe)" in table and all(f"\n{m} " in table for m in methods)
    sites = (workdir / "quant_report.txt").read_text().splitlines()   # the site table goes to a file
    assert len(sites) > 10 and sites[-1].split()[0] not in table
    assert all(results["latency_ms"][m] > 0 for m in ["full_precision", *methods])
    assert "quantized run as int8" in results["latency_ms"]["note"]
    for m in methods:
        mem = results["peak_memory"][m]
        assert mem["rss_peak_mb"] >= mem["rss_start_mb"] > 0 and mem["device_peak_mb"] is None   # CPU
    p = results["reports"]["mrem_p"]
    assert p["shared_devices"] and p["devices"] == [0, 0] and [r["layers"] for r in p["modules"]] == [[0, 1], [1, 2]]
    assert results["calibration"] == {"size": 16, "train_size": 48, "seed": 0}
    rows = json.load(open(workdir / "calibration_indices.json"))
    assert len(set(rows)) == 16 and max(rows) < 48
    assert results["full_precision"]["loyalty"] == 1.0
    assert set(results["after"]) == set(methods) and all(results["wall_seconds"][m] > 0 for m in methods)
    errors = json.load(open(workdir / "layer_errors.json"))
    assert set(errors) == {"quantized_init", *methods} and all(len(v) == 2 for v in errors.values())
    assert (workdir / "layer_errors.png").stat().st_size > 1000
    assert [r["layers"] for r in results["reports"]["mrem_s"]] == [[0, 1], [1, 2]]
    for m in methods:
        assert (workdir / m / "quantized" / "model.safetensors").exists()
    assert json.load(open(workdir / "results.json")) == results


@pytest.mark.slow
def test_mrem_s_beats_rem_and_mrem_p_is_close_at_2_2_8_on_the_builtin_task(finetuned_minilm_dir, tmp_path):
    """configs/ptq_2_2_8.py on the fine-tuned MiniLM (512 calibration rows, short runs); MREM-P
    with the modules sharing this process's device(s) (same algorithm, queues and forcing)."""
    from configs import ptq_2_2_8
    from efficient_nlp.recipes import ptq as recipe
    config = ptq_2_2_8.get_config(method="rem,mrem_s,mrem_p")
    config.teacher_dir = finetuned_minilm_dir
    config.ptq.calibration_size = 512
    config.ptq.rem.steps = 50
    config.ptq.mrem.steps = 100
    results = recipe.run(config, str(tmp_path))
    acc = {m: r["accuracy"] for m, r in results["after"].items()}
    assert acc["mrem_s"] > acc["rem"] + 0.02, results["after"]
    assert acc["mrem_p"] > acc["rem"] + 0.02 and abs(acc["mrem_p"] - acc["mrem_s"]) <= 0.03, results["after"]
    assert results["layer_errors"]["mrem_s"][-1] < results["layer_errors"]["rem"][-1]
