"""The reproduction report: table / Pareto writers, row orchestration (failed and unavailable rows,
``--only`` merging), every row's config accepted by its recipe (fast); every row on a tiny model (slow)."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from efficient_nlp import models, report
from efficient_nlp.report import Experiment, Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root

TINY = dict(name="tiny", description="tiny settings for tests", max_length=16, batch_size=8, eval_batch_size=64,
            max_train_examples=96, qat_steps=(2, 2), ptq_calibration=16, ptq_batch_size=8, rem_steps=2,
            mrem_steps=2, binarybert_steps=2, prune_steps=4, cd_steps=2, distill_steps=(2, 2),
            latency_batch=2, latency_repeats=2)


@pytest.fixture(scope="module")
def tiny_teacher(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_report_teacher", models.BertForSequenceClassification, hidden_size=32,
                               num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, num_labels=9)


def tiny_settings():
    return dataclasses.replace(report.Settings.fast(), **TINY)


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
    rows = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher,
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
    monkeypatch.setattr(recipes, "run_recipe", lambda config, workdir: {"accuracy": 0.25})
    again = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, only=("good",))
    assert calls == ["build"] and [r.key for r in again] == [r.key for r in rows]
    assert again[1].metric == 0.25 and again[2].status == "failed"
    walls = json.load(open(work / "walls.json"))      # the total counts each row's latest run once
    elapsed = walls.pop("_elapsed")                   # the first run covered every row; --only keeps it
    assert elapsed["jobs"] == 1 and elapsed["seconds"] > 0
    assert set(walls) == {"fp", "good", "bad", "later"} and all(v >= 0 for v in walls.values())
    total = sum(walls.values()) / 60
    assert f"total wall time {total:.1f} min" in (work / "results.md").read_text()
    with pytest.raises(ValueError, match="matches no row"):
        report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, only=("nope",))

    # --remeasure re-reads the saved results and keeps the recorded times; no recipe runs
    def no_recipe(config, workdir):
        raise AssertionError("--remeasure must not rerun a recipe")

    with open(work / "good" / "results.json", "w") as f:
        json.dump({"accuracy": 0.75}, f)
    seconds = json.load(open(work / "good" / "report_seconds.json"))["seconds"]
    monkeypatch.setattr(recipes, "run_recipe", no_recipe)
    calls.clear()
    again = report.build_report(str(work), tiny_settings(), teacher_dir=tiny_teacher, remeasure=True)
    assert again[1].metric == 0.75 and again[1].seconds == seconds and again[1].latency_ms > 0
    assert [r.status for r in again] == [r.status for r in rows] and again[2].note == rows[2].note
    assert json.load(open(work / "walls.json"))["good"] == walls["good"]
    with pytest.raises(FileNotFoundError, match="--remeasure without --teacher"):
        report.build_report(str(tmp_path / "empty"), tiny_settings(), remeasure=True)


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
        assert teacher == tiny_teacher, exp.key
        if "train" in config:
            assert config.train.seed == 0 and config.train.batch_size == 8
        for stage in config.get("distill", {}).get("stages", []):
            assert stage["num_steps"] == 2, exp.key
    assert {"qat_4_4_8", "qat_2_2_8", "qat_1_1_8", "ptq_4_4_8", "ptq_2_2_8", "prune_magnitude_90",
            "prune_movement_90", "prune_structured_50", "fewshot_wo_cd", "fewshot_cd", "distill_2l"} <= keys


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
    rows = report.build_report(str(tmp_path), tiny_settings(), teacher_dir=tiny_teacher)
    by = {r.key: r for r in rows}
    expected = ["fp"] + [k for e in report.experiments()
                         for k in ([e.key] if len(e.methods) == 1 else [f"{e.key}_{i}" for i in range(len(e.methods))])]
    assert list(by) == expected
    failed = {k: r.note for k, r in by.items() if r.status == "failed"}
    assert not failed
    for key, r in by.items():
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
