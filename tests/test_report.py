"""The reproduction report: table / Pareto writers, row orchestration (failed and unavailable rows,
``--only`` merging), every row's config accepted by its recipe (fast); every row on a tiny model (slow).
The decoder section: lower perplexity is better, its rows' configs and collection from recorded
results on a tiny decoder, its full-precision row, the skipped section without the default decoder."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, report
from efficient_nlp.report import Experiment, Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root

TINY = dict(name="tiny", description="tiny settings for tests", max_length=16, batch_size=8, eval_batch_size=64,
            max_train_examples=96, qat_steps=(2, 2), ptq_calibration=16, ptq_batch_size=8, rem_steps=2,
            mrem_steps=2, binarybert_steps=2, prune_steps=4, cd_steps=2, distill_steps=(2, 2),
            oneshot_calibration=16, oneshot_mrem_steps=2, lowrank_steps=(2, 2), sharing_steps=(2, 2), peft_steps=2,
            early_exit_steps=2, token_skip_steps=(2, 2),
            latency_batch=2, latency_repeats=2)
TINY_LM = dict(lm_description="tiny decoder settings for tests", lm_block_size=32, lm_max_documents=200,
               lm_eval_blocks=8, lm_batch_size=4, lm_qat_steps=(2, 2), lm_ptq_calibration=16, lm_rem_steps=2,
               lm_mrem_steps=2, lm_prune_steps=4, lm_distill_steps=(2, 2), lm_oneshot_calibration=16,
               lm_oneshot_mrem_steps=2, lm_prompt_len=8, lm_decode_tokens=4)


@pytest.fixture(scope="module")
def tiny_teacher(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_report_teacher", models.BertForSequenceClassification, hidden_size=32,
                               num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, num_labels=9)


def tiny_settings():
    return dataclasses.replace(report.Settings.fast(), **TINY, **TINY_LM)


# ----------------------------------------------------------------------------- writers
def test_pareto_front_is_exactly_the_non_dominated_points():
    assert report.pareto_front([(1, 0.5), (2, 0.7), (3, 0.6), (0.5, 0.2), (2, 0.7)]) == [3, 0, 1, 4]
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = [tuple(p) for p in rng.integers(0, 6, (12, 2)).astype(float)]
        front = set(report.pareto_front(pts))

        def dominated(i):
            return any(s <= pts[i][0] and a >= pts[i][1] and (s, a) != pts[i] for s, a in pts)

        assert front == {i for i in range(len(pts)) if not dominated(i)}


def _rows():
    return [Row("fp", "full precision", "ok", 0.81, 86.7, 22_700_000, 1.4e9, 1.4e9, 12.0, None, "", "teacher"),
            Row("qat", "QAT 2-2-8", "ok", 0.79, 6.4, 22_700_000, 1.4e9, 0.38e9, 30.0, 600.0, "", "a | b"),
            Row("ptq_2", "PTQ MREM-P", "not available", note="recipe ptq has no method 'mrem_p'"),
            Row("x", "broken", "failed", note="ValueError: bad config")]


def test_table_has_one_line_per_row_and_says_why_rows_are_missing():
    lines = report.format_table(_rows(), "accuracy").splitlines()
    assert len(lines) == 2 + 4 and "dev accuracy" in lines[0]
    assert {line.count("|") for line in lines} == {len(report.COLUMNS) + 1}  # "a | b" was escaped
    assert "| QAT 2-2-8 | 0.7900 | 6.40 | 22.70 M | 1.400 | 0.380 | 30.0 | 600 |" in lines[3]
    assert "not available" in lines[4] and "mrem_p" in lines[4]
    assert "failed" in lines[5] and "ValueError: bad config" in lines[5]


def test_pareto_plot_is_written_with_missing_rows(tmp_path):
    path = report.plot_pareto(_rows(), str(tmp_path / "p.png"))
    assert os.path.getsize(path) > 5000


# ----------------------------------------------------------------------------- orchestration
def _fake_experiments(calls):
    def build(ctx):
        calls.append("build")
        return {"accuracy": 0.5}

    def collect(ctx, config, results, run_dir, seconds):
        return [ctx.float_row(Row("", "", metric=results["accuracy"], seconds=seconds), ctx.teacher)]

    def broken(ctx):
        raise ValueError("config.x is wrong")

    return [Experiment("good", ("a good row",), build, collect),
            Experiment("bad", ("two rows", "of a broken run"), broken, collect),
            Experiment("later", ("not here",), build, collect, lambda ctx: "recipe later is not registered")]


def test_failed_and_unavailable_rows_are_reported_and_the_rest_continue(tiny_teacher, tmp_path, monkeypatch):
    from efficient_nlp import recipes
    calls = []
    monkeypatch.setattr(report, "experiments", lambda: _fake_experiments(calls))
    monkeypatch.setattr(recipes, "run_recipe", lambda config, workdir: dict(config))
    work = tmp_path / "report"
    rows = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, section="encoder",
                               markdown=str(tmp_path / "docs" / "results.md"))
    assert [r.key for r in rows] == ["fp", "good", "bad_0", "bad_1", "later"]
    assert [r.status for r in rows] == ["ok", "ok", "failed", "failed", "not available"]
    assert calls == ["build"]                           # the unavailable row never built its config
    fp, good = rows[0], rows[1]
    assert good.metric == 0.5 and good.params == fp.params and good.flops == fp.flops > 0
    assert fp.size_mb == pytest.approx(os.path.getsize(os.path.join(tiny_teacher, "model.safetensors")) / 2 ** 20)
    assert rows[2].note == "ValueError: config.x is wrong"
    assert "config.x is wrong" in (work / "bad" / "error.txt").read_text()
    assert rows[4].note == "recipe later is not registered"
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "![dev accuracy vs stored size](results_pareto.png)" in page
    assert os.path.getsize(tmp_path / "docs" / "results_pareto.png") > 5000
    assert [r["key"] for r in json.load(open(work / "rows.json"))] == [r.key for r in rows]

    # --only reruns the selected rows and keeps the others' records
    calls.clear()
    monkeypatch.setattr(recipes, "run_recipe",
                        lambda config, workdir: {"accuracy": 0.25, "compute": {"energy_kwh": 0.002}})
    again = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, only=("good",),
                                section="encoder")
    assert calls == ["build"] and [r.key for r in again] == [r.key for r in rows]
    assert again[1].metric == 0.25 and again[2].status == "failed"
    assert good.energy_wh is None and again[1].energy_wh == pytest.approx(2.0)  # from the run's compute
    assert "| 2.00 |" in (work / "results.md").read_text()
    walls = json.load(open(work / "walls.json"))      # the total counts each row's latest run once
    elapsed = walls.pop("_elapsed")                   # the first run covered every row; --only keeps it
    assert elapsed["jobs"] == 1 and elapsed["seconds"] > 0
    assert set(walls) == {"fp", "good", "bad", "later"} and all(v >= 0 for v in walls.values())
    total = sum(walls.values()) / 60
    assert f"total wall time {total:.1f} min" in (work / "results.md").read_text()
    with pytest.raises(ValueError, match="matches no row"):
        report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, only=("nope",), section="encoder")

    # --remeasure re-reads the saved results and keeps the recorded times; no recipe runs
    def no_recipe(config, workdir):
        raise AssertionError("--remeasure must not rerun a recipe")

    with open(work / "good" / "results.json", "w") as f:
        json.dump({"accuracy": 0.75}, f)
    seconds = json.load(open(work / "good" / "report_seconds.json"))["seconds"]
    monkeypatch.setattr(recipes, "run_recipe", no_recipe)
    calls.clear()
    again = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, remeasure=True,
                                section="encoder")
    assert again[1].metric == 0.75 and again[1].seconds == seconds and again[1].latency_ms > 0
    assert [r.status for r in again] == [r.status for r in rows] and again[2].note == rows[2].note
    assert json.load(open(work / "walls.json"))["good"] == walls["good"]
    with pytest.raises(FileNotFoundError, match="--remeasure without --teacher"):
        report.build_report(str(tmp_path / "empty"), tiny_settings(), remeasure=True, section="encoder")


def test_every_row_config_passes_its_recipe_checks(tiny_teacher, tmp_path):
    """Config-time validation of each real row's config on the tiny teacher (no training)."""
    import importlib

    from efficient_nlp.recipes import RECIPES
    report._ensure_configs_importable()
    ctx = report.Context(tiny_settings(), tiny_teacher, str(tmp_path))
    keys = set()
    for exp in report.experiments():
        if exp.available(ctx):
            continue
        config = exp.build(ctx)
        keys.add(exp.key)
        assert config.recipe in RECIPES
        recipe = importlib.import_module(RECIPES[config.recipe])
        if hasattr(recipe, "check_config"):
            recipe.check_config(config)
        teacher = config.get("teacher_dir") or config.get("model_dir")
        # the parameter-efficient rows fine-tune the pretrained model, as the teacher was
        assert teacher == (ctx.settings.model_dir if exp.key == "peft" else tiny_teacher), exp.key
        if "train" in config:
            assert config.train.seed == 0 and config.train.batch_size == 8
        for stage in config.get("distill", {}).get("stages", []):
            assert stage["num_steps"] == 2, exp.key
    assert {"qat_4_4_8", "qat_2_2_8", "qat_1_1_8", "ptq_4_4_8", "ptq_2_2_8", "oneshot", "prune_magnitude_90",
            "prune_movement_90", "prune_structured_50", "fewshot_wo_cd", "fewshot_cd", "distill_2l", "lowrank_svd",
            "sharing", "peft"} <= keys


# ----------------------------------------------------------------------------- one-shot rows
@pytest.fixture(scope="module")
def encoder_ctx(tiny_teacher, tmp_path_factory):
    report.ensure_configs_importable()
    return report.Context(tiny_settings(), tiny_teacher, str(tmp_path_factory.mktemp("encoder_report")))


def _experiment(exps, key):
    return next(e for e in exps if e.key == key)


def test_oneshot_experiment_runs_the_reduced_table_once_with_one_title_per_row(encoder_ctx, tiny_teacher):
    """One recipe run: the recipe's own check accepts the config, and the rows it will report
    (settings x methods + pruning methods x sparsities) are exactly the experiment's titles."""
    from efficient_nlp.recipes import oneshot as recipe
    exp = _experiment(report.experiments(), "oneshot")
    config = exp.build(encoder_ctx)
    settings, methods, pruners, sparsities = recipe.check_config(config)
    assert [s.name for s in settings] == ["w4g128", "w8a8"]
    assert methods == ["rtn", "gptq", "awq", "smoothquant", "gptq+mrem_s"]
    assert pruners == ["sparsegpt", "wanda", "magnitude"] and sparsities == [(0.5, (2, 4))]
    assert len(exp.methods) == len(settings) * len(methods) + len(pruners) * len(sparsities) == len(set(exp.methods))
    assert (exp.methods[1], exp.methods[8], exp.methods[-1]) == (
        "GPTQ W4 g128 (one-shot)", "SmoothQuant W8A8 (one-shot)", "pruning, magnitude 2:4 (one-shot)")
    o = config.oneshot
    assert (o.calibration_size, o.mrem.steps, o.mrem.num_modules, o.seed, o.save_packed) == (16, 2, 3, 0, True)
    assert config.teacher_dir == tiny_teacher and config.data.max_length == 16 and config.train.eval_batch_size == 64


def test_full_settings_keep_the_oneshot_configs_own_sizes(tiny_teacher):
    """``Settings.full`` runs configs/oneshot.py and configs/lm_oneshot.py at their own
    calibration size and MREM-S steps (only the table is reduced)."""
    import types

    from configs import lm_oneshot, oneshot
    report.ensure_configs_importable()
    ctx = types.SimpleNamespace(settings=report.Settings.full(), teacher_dir=tiny_teacher, num_layers=6)
    for exps, module in ((report.experiments(), oneshot), (report.decoder_experiments(), lm_oneshot)):
        key = "oneshot" if module is oneshot else "lm_oneshot"
        got, want = _experiment(exps, key).build(ctx).oneshot, module.get_config().oneshot
        assert (got.calibration_size, got.mrem.steps) == (want.calibration_size, want.mrem.steps), key


def _oneshot_results(settings, metrics_of):
    """A oneshot recipe's results.json for the report's table: row ``i`` has ``metrics_of(i)``
    and ``i + 1`` seconds; pruned rows keep half of the weights."""
    results = {"calibration": {"size": 16, "train_size": 96, "seed": 0}, "quant": {}, "prune": {}}
    for i, (table, key, method) in enumerate(report.rows.oneshot_table(settings)):
        row = {"metrics": metrics_of(i), "seconds": float(i + 1), "peak_rss_mb": 100.0, "layer_error": 0.1}
        row.update(dict(packed_mb=1.0, rtn_layer_error=0.2) if table == "quant" else dict(density=0.5))
        results[table].setdefault(key, {})[method] = row
    return results


def _stub_measurements(ctx, monkeypatch):
    """Records the (spec, packed dir) each quantized row is measured from, and the models timed."""
    seen, timed = [], []

    def quantized_row(row, spec, packed_dir):
        seen.append((spec, packed_dir))
        row.size_mb = 1.0
        return row

    def time(row, model):
        timed.append(model)
        row.latency_ms = 1.0
        return row

    monkeypatch.setattr(ctx, "quantized_row", quantized_row)
    monkeypatch.setattr(ctx, "time", time)
    return seen, timed


def _check_oneshot_rows(ctx, rows, seen, timed, settings, group_size, run_dir, unit, layer_kernels):
    methods, n = report.rows.ONESHOT_METHODS, len(report.rows.ONESHOT_METHODS)
    assert [r.seconds for r in rows] == [float(i + 1) for i in range(len(rows))]
    # quantized rows: measured from each packed artefact under its setting's spec
    assert [d for _, d in seen] == [os.path.join(run_dir, s, m.replace("+", "_")) for s in settings for m in methods]
    w4 = [(sp.weight.bits, sp.weight.granularity, sp.weight.group_size, sp.activation) for sp, _ in seen[:n]]
    w8a8 = [(sp.weight.bits, sp.weight.granularity, sp.activation.bits) for sp, _ in seen[n:]]
    assert w4 == [(4, "group", group_size, None)] * n and w8a8 == [(8, "channel", 8)] * n
    assert all(f"16 calibration {unit}" in r.note for r in rows)
    assert "time: MREM-S only" in rows[n - 1].note and "then RTN" in rows[2].note
    # pruned rows: no model kept, so the dense teacher's size and cost, half of the layer Linears'
    # weights (``layer_kernels`` of them) zero, no latency
    fp = ctx.float_row(Row("", ""), ctx.teacher, ctx.teacher_dir)
    for r in rows[2 * n:]:
        assert (r.size_mb, r.flops, r.bops) == (fp.size_mb, fp.flops, fp.bops)
        assert r.params == fp.params - layer_kernels // 2
        assert r.latency_ms is None and "latency not measured" in r.note
    assert timed == [ctx.teacher]                      # only the reference row above was timed


def test_oneshot_collect_turns_recorded_results_into_one_row_per_setting_and_method(encoder_ctx, tmp_path,
                                                                                  monkeypatch):
    ctx = encoder_ctx
    seen, timed = _stub_measurements(ctx, monkeypatch)
    exp = _experiment(report.experiments(), "oneshot")
    results = _oneshot_results(report.rows.ONESHOT_SETTINGS, lambda i: {"accuracy": i / 100, "loyalty": 0.5})
    rows = exp.collect(ctx, exp.build(ctx), results, str(tmp_path), 999.0)
    assert len(rows) == len(exp.methods) and [r.metric for r in rows] == [i / 100 for i in range(len(rows))]
    # 4 layers of q, k, v, o [32, 32] and the FFN's [32, 64], [64, 32]
    _check_oneshot_rows(ctx, rows, seen, timed, report.rows.ONESHOT_SETTINGS, 128, str(tmp_path), "rows",
                        4 * (4 * 32 * 32 + 2 * 32 * 64))


def test_a_group_wise_artefact_is_measured_where_the_oneshot_recipe_keeps_it(encoder_ctx, tmp_path, monkeypatch):
    """The packed file the recipe writes with ``save_packed`` is the one the row reads: its size
    is the recipe's packed_mb, W4A16 costs full FLOPs (float activations) and the timed model
    runs the group-wise kernels dequantized."""
    import ml_collections

    from efficient_nlp import quant
    from efficient_nlp.quant.integer import DequantLinear
    from efficient_nlp.recipes import oneshot as recipe
    ctx, timed = encoder_ctx, []
    monkeypatch.setattr(ctx, "time", lambda row, model: (timed.append(model), row)[1])
    spec = recipe.parse_setting("w4g16").spec("pact")
    qmodel, _ = quant.quantize_model(ctx.teacher, spec)
    quant.calibrate(qmodel, ctx.sample)
    packed_mb = recipe._packed_mb(qmodel, str(tmp_path), ml_collections.ConfigDict(dict(save_packed=True)),
                                  "w4g16", "gptq+mrem_s")
    row = ctx.quantized_row(Row("", ""), spec, recipe.packed_dir(str(tmp_path), "w4g16", "gptq+mrem_s"))
    assert row.size_mb == packed_mb and row.bops == row.flops > 0
    assert len(timed) == 1 and any(isinstance(m, DequantLinear) for _, m in nnx.iter_graph(timed[0]))


def _pruned_row_matches_the_pruned_model(ctx, out_dir, monkeypatch):
    """`Context.pruned_row` counts no model: its nonzero params, from the mean density the recipe
    records, equal those of the model one-shot 2:4 pruning makes, and size and cost those of
    that model saved (dense, as the other unstructured pruning rows store and run it)."""
    from efficient_nlp import oneshot
    monkeypatch.setattr(ctx, "time", lambda row, model: row)
    calib = {k: v[:8] for k, v in ctx.task.train.items()}
    result = oneshot.prune(ctx.teacher, calib, method="magnitude", sparsity=0.5, n_m=(2, 4), log=None)
    models.save_hf_checkpoint(result.model, out_dir)
    want = ctx.float_row(Row("", ""), result.model, str(out_dir))
    fp = ctx.float_row(Row("", ""), ctx.teacher)
    row = ctx.pruned_row(Row("", ""), float(np.mean([r["density"] for r in result.report])))
    assert row.params == want.params < fp.params
    assert (row.size_mb, row.flops, row.bops) == (want.size_mb, want.flops, want.bops) and row.latency_ms is None


@pytest.mark.slow  # ~20 s: compiling the one-shot pass
def test_pruned_row_counts_the_nonzeros_of_the_model_the_oneshot_recipe_prunes(encoder_ctx, tmp_path, monkeypatch):
    _pruned_row_matches_the_pruned_model(encoder_ctx, tmp_path / "pruned", monkeypatch)


# ----------------------------------------------------------------------------- --jobs
def test_a_failing_recipe_process_is_reported_with_its_traceback_and_log(tmp_path):
    """`run_recipes_in_parallel` runs each row in a fresh process: an error there comes back as the
    row's message, with the traceback in error.txt and the process's output in report.log."""
    import types
    ctx = types.SimpleNamespace(settings=tiny_settings(), teacher_dir=str(tmp_path / "no_teacher"),
                                workdir=str(tmp_path))
    exps = [e for e in report.experiments() if e.key in ("qat_1_1_8", "distill_2l")]
    done = report.run_recipes_in_parallel(exps, ctx, 2, {})
    assert set(done) == {"qat_1_1_8", "distill_2l"}
    for key, (seconds, error) in done.items():
        assert seconds > 0 and "no_teacher" in error, (key, error)
        assert "Traceback" in (tmp_path / key / "error.txt").read_text()
        assert "no_teacher" in (tmp_path / key / "report.log").read_text()
        assert not (tmp_path / key / "report_seconds.json").exists()


def test_a_decoder_recipe_process_builds_the_decoder_context(tmp_path):
    """With ``--jobs`` the fresh process of a decoder row looks it up among the decoder rows and
    builds a `DecoderContext` (here on a missing decoder, whose error comes back as the row's)."""
    import types
    ctx = types.SimpleNamespace(settings=tiny_settings(), teacher_dir=str(tmp_path / "no_decoder"),
                                workdir=str(tmp_path), section="decoder")
    exps = [e for e in report.decoder_experiments() if e.key == "lm_distill_half"]
    done = report.run_recipes_in_parallel(exps, ctx, 2, {})
    seconds, error = done["lm_distill_half"]
    assert "no_decoder" in error and "Traceback" in (tmp_path / "lm_distill_half" / "error.txt").read_text()
    assert "decoder_rows.py" in (tmp_path / "lm_distill_half" / "error.txt").read_text()   # DecoderContext


@pytest.mark.slow  # two tiny recipes, once in process and once two at a time in fresh processes
def test_rows_run_two_at_a_time_equal_rows_run_in_process(tiny_teacher, tmp_path):
    only = ("qat_1_1_8", "distill_2l")
    seq = report.build_report(str(tmp_path / "seq"), tiny_settings(), teacher_dir=tiny_teacher, only=only)
    par = report.build_report(str(tmp_path / "par"), tiny_settings(), teacher_dir=tiny_teacher, only=only, jobs=2)
    assert [r.key for r in par] == [r.key for r in seq] == ["fp", "qat_1_1_8", "distill_2l"]
    for a, b in zip(seq, par):
        assert b.status == "ok" and (a.metric, a.size_mb, a.params, a.flops, a.bops) == \
            (b.metric, b.size_mb, b.params, b.flops, b.bops), a.key
    for key in only:
        assert os.path.getsize(tmp_path / "par" / key / "report.log") > 0
        assert json.load(open(tmp_path / "par" / key / "report_seconds.json"))["seconds"] > 0


# ----------------------------------------------------------------------------- every row (slow)
@pytest.mark.slow  # ~15 min on the shared 2-core machine (mostly XLA compiles of a dozen recipe runs)
def test_fast_path_produces_every_row_on_a_tiny_model(tiny_teacher, tmp_path):
    rows = report.build_report(str(tmp_path), tiny_settings(), teacher_dir=tiny_teacher, section="encoder")
    by = {r.key: r for r in rows}
    expected = ["fp"] + [k for e in report.experiments()
                         for k in ([e.key] if len(e.methods) == 1 else [f"{e.key}_{i}" for i in range(len(e.methods))])]
    assert list(by) == expected
    failed = {k: r.note for k, r in by.items() if r.status == "failed"}
    # the one-shot rows quantize groups of 128 inputs: on this 32-wide teacher they fail, saying why
    # (test_oneshot_rows_on_a_tiny_model runs them on a teacher 128 wide)
    oneshot = {k: failed.pop(k) for k in list(failed) if k.startswith("oneshot")}
    assert len(oneshot) == len(report.rows.ONESHOT.methods)
    assert all("group size 128 does not divide d_in=32" in note for note in oneshot.values())
    assert not failed
    for key, r in by.items():
        if key in oneshot:
            continue
        if r.status == "not available":
            assert key.startswith(("ptq", "binarybert")) and r.note
            continue
        assert 0 <= r.metric <= 1 and r.size_mb > 0 and r.flops > 0, key
        assert os.path.exists(os.path.join(r.run_dir, "results.json")), key
    fp = by["fp"]
    for key in ("qat_4_4_8", "qat_2_2_8", "qat_1_1_8", "ptq_2_2_8_0", "ptq_2_2_8_1"):
        assert by[key].size_mb < fp.size_mb / 2 and by[key].bops < fp.bops, key
    assert by["qat_1_1_8"].size_mb < by["qat_2_2_8"].size_mb < by["qat_4_4_8"].size_mb
    assert by["prune_structured_50"].flops < fp.flops and by["prune_structured_50"].params < fp.params
    assert by["prune_magnitude_90"].params < fp.params and by["prune_movement_90"].params < fp.params
    assert by["distill_2l"].params < fp.params
    assert all(by[k].latency_ms > 0 for k in by if by[k].status == "ok")   # TWS: from its packed file
    assert (tmp_path / "results.md").exists() and (tmp_path / "results_pareto.png").exists()


# ----------------------------------------------------------------------------- decoder section
def test_lower_perplexity_is_better_on_the_pareto_front_and_in_the_plot(tmp_path):
    points = [(1, 30.0), (2, 20.0), (3, 25.0), (0.5, 90.0), (2, 20.0)]
    assert report.pareto_front(points, higher_is_better=False) == [3, 0, 1, 4]
    # the same points with the metric negated are the higher-is-better case
    assert report.pareto_front([(s, -p) for s, p in points]) == [3, 0, 1, 4]
    rows = [Row("lm_fp", "fp", "ok", 20.0, 16.0, section="decoder"),
            Row("lm_q", "q", "ok", 25.0, 2.0, section="decoder")]
    path = report.plot_pareto(rows, str(tmp_path / "d.png"), metric_name="perplexity", higher_is_better=False,
                              reference_key="lm_fp")
    assert os.path.getsize(path) > 5000


def test_decoder_table_shows_perplexity_token_accuracy_and_per_token_costs():
    rows = [Row("lm_fp", "full precision", "ok", 23.456, 15.9, 4_000_000, 8.1e6, 8.1e6, 0.1234, None, "", "d",
                section="decoder", metrics={"perplexity": 23.456, "token_accuracy": 0.31}, decode_ms=0.9),
            Row("lm_ptq_4_4_8_1", "PTQ MREM-S", "not available", note="no mrem_s", section="decoder")]
    lines = report.format_decoder_table(rows).splitlines()
    assert lines[0] == "| " + " | ".join(report.DECODER_COLUMNS) + " |"
    assert lines[2] == ("| full precision | 23.46 | 0.3100 | 15.90 | 4.00 M | 8.10 | 8.10 | 0.123 | 0.900 |  "
                        "|  | d |")
    assert lines[3].startswith("| PTQ MREM-S | not available |") and lines[3].endswith("| no mrem_s |")
    assert {line.count("|") for line in lines} == {len(report.DECODER_COLUMNS) + 1}


@pytest.fixture(scope="module")
def decoder_ctx(tiny_decoder_dir, tmp_path_factory):
    report.ensure_configs_importable()
    return report.DecoderContext(tiny_settings(), tiny_decoder_dir, str(tmp_path_factory.mktemp("decoder_report")))


def test_every_decoder_row_config_passes_its_recipe_checks(decoder_ctx, tiny_decoder_dir):
    """Each decoder row's config is a configs/lm_*.py file on the LM task with the settings'
    sizes, the tiny decoder's depth and the recipes' own config-time checks."""
    import importlib

    from efficient_nlp.recipes import RECIPES
    ctx = decoder_ctx
    assert ctx.num_layers == 2 and ctx.metric_name == "perplexity" and not ctx.higher_is_better
    assert ctx.task.dev["input_ids"].shape == (8, 32)
    configs = {}
    for exp in report.decoder_experiments():
        assert exp.available(ctx) is None, exp.key
        config = configs[exp.key] = exp.build(ctx)
        recipe = importlib.import_module(RECIPES[config.recipe])
        if hasattr(recipe, "check_config"):
            recipe.check_config(config)
        assert config.data.task == "lm" and config.model_dir == tiny_decoder_dir, exp.key
        assert config.get("teacher_dir", tiny_decoder_dir) == tiny_decoder_dir, exp.key
        assert (config.data.max_length, config.data.max_documents, config.data.eval_blocks) == (32, 200, 8)
        assert config.train.seed == 0 and config.train.batch_size == 4 and config.train.eval_every == 0
        for stage in config.get("distill", {}).get("stages", []):
            assert stage["num_steps"] == 2, exp.key
    assert [e.key for e in report.decoder_experiments()] == [
        "lm_qat_4_4_8", "lm_ptq_4_4_8", "lm_oneshot", "lm_prune_structured_50", "lm_prune_magnitude_50",
        "lm_distill_half"]
    from efficient_nlp.recipes import oneshot as oneshot_recipe
    settings, methods, pruners, sparsities = oneshot_recipe.check_config(configs["lm_oneshot"])
    assert [s.name for s in settings] == ["w4g64", "w8a8"] and sparsities == [(0.5, (2, 4))]
    assert len(settings) * len(methods) + len(pruners) == len(_experiment(report.decoder_experiments(),
                                                                          "lm_oneshot").methods) == 13
    o = configs["lm_oneshot"].oneshot
    assert (o.calibration_size, o.mrem.steps, o.mrem.num_modules, o.save_packed) == (16, 2, 2, True)
    ptq = configs["lm_ptq_4_4_8"].ptq
    assert ptq.method == "rem,mrem_s" and (ptq.calibration_size, ptq.rem.steps, ptq.mrem.steps) == (16, 2, 2)
    assert ptq.mrem.num_modules == 2
    assert configs["lm_prune_structured_50"].prune.shrink and configs["lm_prune_structured_50"].train.num_steps == 4
    qat_matches = configs["lm_qat_4_4_8"].distill.stages[0]["matches"]
    assert max(m.get("student_layer", 0) for m in qat_matches) == 1          # the decoder's 2 layers, not 4
    student = configs["lm_distill_half"]        # layers 0, 2, ... of the decoder; hidden states on the uniform map
    assert tuple(student.student.layers) == (0,)
    assert [(m["student_layer"], m["teacher_layer"]) for m in student.distill.stages[0]["matches"]] == [(0, 0), (1, 2)]
    assert student.distill.stages[1]["matches"] == [dict(feature="logits", loss="kl")]


def _lm(perplexity, accuracy):
    return {"perplexity": perplexity, "nll": float(np.log(perplexity)), "token_accuracy": accuracy, "loyalty": 0.5}


def _collect_setup(ctx, monkeypatch):
    """The decoder experiments and their configs, the decoder's nonzero parameters and FLOPs per
    token, and the list of models the rows are timed on (timing stubbed)."""
    from efficient_nlp import quant
    timed = []

    def fake_time(row, model):
        timed.append(model)
        row.latency_ms = 1.0
        return row

    monkeypatch.setattr(ctx, "time", fake_time)
    exps = {e.key: e for e in report.decoder_experiments()}
    configs = {k: e.build(ctx) for k, e in exps.items()}
    teacher = ctx.teacher
    fp_params = sum(int(np.count_nonzero(np.asarray(v.get_value()))) for v in models.named_params(teacher).values())
    fp_flops = quant.cost_report(teacher, None, ctx.sample).summary()["flops"] / 32
    return exps, configs, fp_params, fp_flops, timed


def test_decoder_collect_turns_recorded_quantization_results_into_rows(decoder_ctx, tmp_path, monkeypatch):
    """Recorded QAT / PTQ results and packed artefacts (no training) become rows: perplexity as
    the metric, the packed files' sizes, BOPs per token, timed on the int8 model."""
    from efficient_nlp import quant
    from efficient_nlp.quant.integer import IntLinear
    ctx = decoder_ctx
    exps, configs, fp_params, fp_flops, timed = _collect_setup(ctx, monkeypatch)
    teacher = ctx.teacher

    # QAT and PTQ: packed artefacts of the decoder quantized by each config's spec, where the recipes write them
    for key, sub in (("lm_qat_4_4_8", "quantized"), ("lm_ptq_4_4_8", "mrem_s/quantized")):
        qmodel, _ = quant.quantize_model(teacher, report.rows._spec(configs[key]))   # uncalibrated: only sizes count
        quant.save_packed(quant.export_packed(qmodel), str(tmp_path / key / sub))
    [qat] = exps["lm_qat_4_4_8"].collect(ctx, configs["lm_qat_4_4_8"], {"student": _lm(40.0, 0.2)},
                                         str(tmp_path / "lm_qat_4_4_8"), 12.0)
    assert (qat.metric, qat.metrics, qat.seconds) == (40.0, {k: v for k, v in _lm(40.0, 0.2).items()
                                                             if k != "loyalty"}, 12.0)
    assert qat.size_mb == quant.packed_size_mb(str(tmp_path / "lm_qat_4_4_8/quantized"))
    assert qat.flops == pytest.approx(fp_flops) and qat.bops < qat.flops and qat.note == "2+2 distillation steps"
    # a recipe without REM: that row says so, MREM-S gets its own wall time
    ptq_results = {"after": {"mrem_s": _lm(45.0, 0.15)}, "wall_seconds": {"mrem_s": 4.0}, "calibration": {"size": 16}}
    rem, mrem = exps["lm_ptq_4_4_8"].collect(ctx, configs["lm_ptq_4_4_8"], ptq_results,
                                             str(tmp_path / "lm_ptq_4_4_8"), 99.0)
    assert rem.status == "not available" and "'rem'" in rem.note and rem.metric is None
    assert (mrem.metric, mrem.seconds) == (45.0, 4.0) and "16 calibration blocks" in mrem.note
    assert mrem.size_mb == quant.packed_size_mb(str(tmp_path / "lm_ptq_4_4_8/mrem_s/quantized"))
    assert len(timed) == 2 and all(any(isinstance(m, IntLinear) for _, m in nnx.iter_graph(model))
                                   for model in timed)
    assert all(r.params == fp_params and r.latency_ms == 1.0 for r in (qat, mrem))


def test_decoder_collect_turns_recorded_pruning_and_distillation_results_into_rows(decoder_ctx, tmp_path,
                                                                                   monkeypatch):
    """Recorded pruning / distillation results and saved models (no training) become rows:
    perplexity as the metric, the safetensors sizes, nonzero parameters, FLOPs per token."""
    from efficient_nlp import prune
    ctx = decoder_ctx
    exps, configs, fp_params, fp_flops, timed = _collect_setup(ctx, monkeypatch)
    teacher = ctx.teacher

    # structured pruning: the shrunk model; magnitude: zeros stored dense; distillation: one layer
    full = prune.full_structure(teacher)
    small, _ = prune.shrink(teacher, structure=dict(full, heads=[[0, 1], [2, 3]],
                                                    neurons=[n[:24] for n in full["neurons"]]))
    models.save_hf_checkpoint(small, tmp_path / "lm_prune_structured_50" / "model_shrunk")
    [st] = exps["lm_prune_structured_50"].collect(
        ctx, configs["lm_prune_structured_50"], {"shrink": {"dev_shrunk": _lm(60.0, 0.05)}},
        str(tmp_path / "lm_prune_structured_50"), 7.0)
    assert st.metric == 60.0 and st.params < fp_params and st.flops < fp_flops
    assert st.size_mb == os.path.getsize(tmp_path / "lm_prune_structured_50/model_shrunk/model.safetensors") / 2 ** 20
    dense = models.from_pretrained(ctx.teacher_dir)
    name = next(n for n in models.named_params(dense) if n.endswith("ffn.intermediate.kernel"))
    var = models.named_params(dense)[name]
    var.set_value(np.zeros_like(np.asarray(var.get_value())))
    models.save_hf_checkpoint(dense, tmp_path / "lm_prune_magnitude_50" / "model")
    [mag] = exps["lm_prune_magnitude_50"].collect(
        ctx, configs["lm_prune_magnitude_50"], {"dev_after": _lm(35.0, 0.25), "sparsity_total": 0.5},
        str(tmp_path / "lm_prune_magnitude_50"), 5.0)
    assert mag.metric == 35.0 and mag.params == fp_params - np.asarray(var.get_value()).size
    assert mag.flops == pytest.approx(fp_flops) and "50% of the layers' weights zero" in mag.note
    student, _ = prune.shrink(teacher, structure={k: v[:1] for k, v in full.items()})
    models.save_hf_checkpoint(student, tmp_path / "lm_distill_half" / "student")
    [dist] = exps["lm_distill_half"].collect(ctx, configs["lm_distill_half"],
                                             {"student": _lm(70.0, 0.01), "student_layers": [0]},
                                             str(tmp_path / "lm_distill_half"), 6.0)
    assert dist.metric == 70.0 and dist.params < fp_params and dist.flops < fp_flops
    assert len(timed) == 3 and all(r.latency_ms == 1.0 for r in (st, mag, dist))


def test_decoder_oneshot_collect_reads_perplexity_and_measures_the_w4g64_artefacts(decoder_ctx, tmp_path,
                                                                                   monkeypatch):
    ctx = decoder_ctx
    seen, timed = _stub_measurements(ctx, monkeypatch)
    exp = _experiment(report.decoder_experiments(), "lm_oneshot")
    results = _oneshot_results(report.decoder_rows.LM_ONESHOT_SETTINGS, lambda i: _lm(20.0 + i, 0.3))
    rows = exp.collect(ctx, exp.build(ctx), results, str(tmp_path), 99.0)
    assert len(rows) == len(exp.methods) and [r.metric for r in rows] == [20.0 + i for i in range(len(rows))]
    assert rows[0].metrics == {k: v for k, v in _lm(20.0, 0.3).items() if k != "loyalty"}
    # 2 layers of q, o [32, 32], k, v [32, 16] (2 key/value heads of 8) and gate, up [32, 48], down [48, 32]
    _check_oneshot_rows(ctx, rows, seen, timed, report.decoder_rows.LM_ONESHOT_SETTINGS, 64, str(tmp_path),
                        "blocks", 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48))


@pytest.mark.slow  # ~20 s: compiling the one-shot pass
def test_decoder_pruned_row_counts_the_nonzeros_of_the_model_the_oneshot_recipe_prunes(decoder_ctx, tmp_path,
                                                                                      monkeypatch):
    _pruned_row_matches_the_pruned_model(decoder_ctx, tmp_path / "pruned", monkeypatch)


def test_decoder_full_precision_row_is_the_decoders_held_out_perplexity(decoder_ctx, tiny_decoder_dir):
    """The one real decoder row: perplexity and token accuracy of the decoder's logits on the
    held-out blocks, the safetensors size, and both latencies measured."""
    import jax.numpy as jnp

    from efficient_nlp import data
    ctx = decoder_ctx
    row = report.decoder_fp_row(ctx)
    logits = np.asarray(ctx.teacher(jnp.asarray(ctx.task.dev["input_ids"])).logits)
    want = data.lm_metrics(logits, ctx.task.dev["labels"])
    assert (row.key, row.section, row.status) == ("lm_fp", "decoder", "ok")
    assert row.metric == pytest.approx(want["perplexity"], rel=1e-5)
    assert row.metrics["token_accuracy"] == pytest.approx(want["token_accuracy"])
    assert row.size_mb == os.path.getsize(os.path.join(tiny_decoder_dir, "model.safetensors")) / 2 ** 20
    assert row.params == sum(int(np.count_nonzero(np.asarray(v.get_value())))
                             for v in models.named_params(ctx.teacher).values())
    assert row.latency_ms > 0 and row.decode_ms > 0
    with open(os.path.join(ctx.workdir, "lm_fp", "results.json")) as f:
        assert json.load(f)["dev"]["perplexity"] == pytest.approx(row.metric)


def test_missing_default_decoder_skips_the_section_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENT_NLP_DECODER_DIR", str(tmp_path / "no_decoder"))
    work = tmp_path / "report"
    with pytest.raises(ValueError, match="matches no row of section decoder; row keys: lm_fp, lm_qat_4_4_8"):
        report.build_report(str(work), tiny_settings(), section="decoder", only=("qat",))
    report.main(["--workdir", str(work), "--section", "decoder", "--fast"])
    page = (work / "results.md").read_text()
    assert page.startswith("# Reproduction report") and "## Decoder" in page and "Skipped" in page
    assert str(tmp_path / "no_decoder") in page and "configs/pretrain_causal_lm.py" in page
    assert not (work / "rows.json").exists()       # nothing ran
    # an encoder fragment kept from an earlier run stays on the page, first
    (work / "section_encoder.md").write_text("# Reproduction report\n\nencoder table\n")
    rows = report.build_report(str(work), tiny_settings(), section="decoder")
    page = (work / "results.md").read_text()
    assert rows == [] and page.index("encoder table") < page.index("## Decoder") and "Skipped" in page


def test_decoder_section_runs_its_rows_and_keeps_the_encoder_records(tiny_decoder_dir, tmp_path, monkeypatch):
    """Orchestration of the decoder section with stand-in experiments: rows, sections, failed
    rows, the page and plot, and the encoder rows of an earlier run kept in rows.json."""
    from efficient_nlp import recipes

    def build(ctx):
        return {"perplexity": 42.0}

    def collect(ctx, config, results, run_dir, seconds):
        return [ctx.float_row(Row("", "", metric=results["perplexity"], seconds=seconds), ctx.teacher)]

    def broken(ctx):
        raise ValueError("config.lm is wrong")

    monkeypatch.setattr(report, "decoder_experiments", lambda: [
        Experiment("lm_good", ("a decoder row",), build, collect),
        Experiment("lm_bad", ("a broken decoder row",), broken, collect)])
    monkeypatch.setattr(recipes, "run_recipe", lambda config, workdir: dict(config))
    work = tmp_path / "report"
    work.mkdir()
    report.save_rows(str(work / "rows.json"), [Row("fp", "teacher", "ok", 0.8, 1.0)])
    rows = report.build_report(str(work), tiny_settings(), decoder_dir=tiny_decoder_dir, section="decoder")
    assert [(r.key, r.section, r.status) for r in rows] == [
        ("fp", "encoder", "ok"), ("lm_fp", "decoder", "ok"), ("lm_good", "decoder", "ok"),
        ("lm_bad", "decoder", "failed")]
    assert rows[2].metric == 42.0 and rows[2].params == rows[1].params
    assert rows[3].note == "ValueError: config.lm is wrong"
    page = (work / "results.md").read_text()
    assert "| a decoder row | 42.00 |" in page
    assert "![held-out perplexity vs stored size](results_pareto_decoder.png)" in page
    assert os.path.getsize(work / "results_pareto_decoder.png") > 5000
    assert [r["key"] for r in json.load(open(work / "rows.json"))] == ["fp", "lm_fp", "lm_good", "lm_bad"]
    assert {"lm_fp", "lm_good", "lm_bad", "_elapsed_decoder"} <= set(json.load(open(work / "walls.json")))


@pytest.mark.slow  # ~3 min on the shared 2-core machine (XLA compiles of five recipe runs)
def test_decoder_section_produces_every_row_on_a_tiny_decoder(tiny_decoder_dir, tmp_path):
    rows = report.build_report(str(tmp_path), tiny_settings(), decoder_dir=tiny_decoder_dir, section="decoder")
    by = {r.key: r for r in rows}
    assert list(by) == report.decoder_row_keys()
    # the one-shot rows quantize groups of 64 inputs: on this 32-wide decoder they fail, saying why
    # (test_decoder_oneshot_rows_on_a_tiny_decoder runs them on a decoder 64 wide)
    oneshot = {k: r.note for k, r in by.items() if k.startswith("lm_oneshot")}
    assert all("group size 64 does not divide d_in=32" in note for note in oneshot.values()) and len(oneshot) == 13
    assert not {k: r.note for k, r in by.items() if r.status != "ok" and k not in oneshot}
    fp = by["lm_fp"]
    for key, r in by.items():
        if key in oneshot:
            continue
        assert r.section == "decoder" and 1 < r.metric < 1e4 and 0 <= r.metrics["token_accuracy"] <= 1, key
        assert r.size_mb > 0 and r.latency_ms > 0 and r.decode_ms > 0, key
        assert os.path.exists(os.path.join(r.run_dir, "results.json")), key
    for key in ("lm_qat_4_4_8", "lm_ptq_4_4_8_0", "lm_ptq_4_4_8_1"):
        assert by[key].size_mb < fp.size_mb / 2 and by[key].bops < fp.bops, key
    assert by["lm_prune_structured_50"].flops < fp.flops and by["lm_prune_structured_50"].params < fp.params
    assert by["lm_prune_magnitude_50"].params < fp.params and by["lm_distill_half"].params < fp.params
    assert "## Decoder" in (tmp_path / "results.md").read_text()


# ----------------------------------------------------------------------------- one-shot rows end to end (slow)
def _check_oneshot_run(rows, fp_key, run_dir):
    """The one-shot rows of a real run: all measured; quantized rows smaller than full precision,
    W4 smaller than W8A8, their size the recipe's packed_mb; pruned rows dense, with fewer nonzero
    weights and no latency."""
    fp, oneshot = rows[0], rows[1:]
    n = len(report.rows.ONESHOT_METHODS)
    assert fp.key == fp_key and len(oneshot) == 2 * n + len(report.rows.ONESHOT_PRUNE)
    assert not {r.key: r.note for r in oneshot if r.status != "ok"}
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    packed = [m["packed_mb"] for setting in results["quant"].values() for m in setting.values()]
    assert [r.size_mb for r in oneshot[:2 * n]] == pytest.approx(packed)
    for w4, w8 in zip(oneshot[:n], oneshot[n:2 * n]):
        assert w4.size_mb < w8.size_mb < fp.size_mb and w4.bops == w4.flops    # W4A16: float activations
        assert w4.latency_ms > 0 and w8.latency_ms > 0 and w4.seconds > 0
    for r in oneshot[2 * n:]:
        assert r.size_mb == fp.size_mb and r.params < fp.params and r.latency_ms is None and r.seconds > 0


@pytest.mark.slow  # a few minutes: one oneshot recipe run (13 rows) and the measurements
def test_oneshot_rows_on_a_tiny_model(make_tiny_model_dir, tmp_path):
    teacher = make_tiny_model_dir("tiny_report_oneshot", models.BertForSequenceClassification, hidden_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                  max_position_embeddings=64, num_labels=9)
    # the pooler reads one token per row, so GPTQ / AWQ need as many calibration rows as it has inputs
    settings = dataclasses.replace(tiny_settings(), max_train_examples=256, oneshot_calibration=160)
    rows = report.build_report(str(tmp_path), settings, teacher_dir=teacher, section="encoder", only=("oneshot",))
    assert [r.key for r in rows[1:]] == report.row_keys(report.rows.ONESHOT)
    _check_oneshot_run(rows, "fp", str(tmp_path / "oneshot"))
    assert all(0 <= r.metric <= 1 for r in rows)


@pytest.fixture(scope="module")
def wide_decoder_dir(tiny_decoder_dir, tmp_path_factory):
    """The tiny decoder's tokenizer with a random decoder 64 wide (FFN 128), which groups of 64 divide."""
    import shutil
    config = dataclasses.replace(models.from_pretrained(tiny_decoder_dir).config, hidden_size=64, head_dim=16,
                                 intermediate_size=128)
    out = tmp_path_factory.mktemp("wide_decoder")
    models.save_hf_checkpoint(models.DecoderForCausalLM(config, rngs=nnx.Rngs(0)), out)
    for name in os.listdir(tiny_decoder_dir):
        if name not in os.listdir(out):
            shutil.copy(os.path.join(tiny_decoder_dir, name), out / name)
    return str(out)


@pytest.mark.slow  # a few minutes: one oneshot recipe run (13 rows) and the measurements
def test_decoder_oneshot_rows_on_a_tiny_decoder(wide_decoder_dir, tmp_path):
    rows = report.build_report(str(tmp_path), tiny_settings(), decoder_dir=wide_decoder_dir, section="decoder",
                               only=("lm_oneshot",))
    assert [r.key for r in rows[1:]] == report.row_keys(_experiment(report.decoder_experiments(), "lm_oneshot"))
    _check_oneshot_run(rows, "lm_fp", str(tmp_path / "lm_oneshot"))
    assert all(1 < r.metric < 1e4 and r.decode_ms is None for r in rows[-3:])
