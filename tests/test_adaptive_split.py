"""Adaptive splitting (docs/binarybert_adaptive.md): groups, sensitivity, costs, exact knapsack, choosers."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, quant
from efficient_nlp.quant import adaptive

import _tiny  # tests/_tiny.py

H, L, N, I, C, T = 16, 2, 2, 24, 3, 8


def tiny_bert(seed=0):
    return _tiny.tiny_bert(seed, hidden=H, layers=L, heads=N, intermediate=I, labels=C)


def batch(b=4):
    return _tiny.token_batch(b, T, 50)


def logits(model, b):
    return np.asarray(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).logits)


@pytest.fixture(scope="module")
def ternary():
    float_model = tiny_bert()
    qmodel, _ = quant.quantize_model(float_model, quant.make_spec(2, 2, 8))
    return float_model, qmodel


# ----------------------------------------------------------------------------- knapsack
def brute_force(values, costs, capacity):
    best = 0.0
    for r in range(len(values) + 1):
        for subset in itertools.combinations(range(len(values)), r):
            if sum(costs[i] for i in subset) <= capacity:
                best = max(best, sum(values[i] for i in subset))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    values = list(rng.normal(1.0, 1.0, n))              # some negative: never worth taking
    costs = [int(c) for c in rng.integers(0, 20, n)]     # zero-cost items included
    capacity = int(rng.integers(0, 60))
    chosen = adaptive.knapsack(values, costs, capacity)
    assert sum(costs[i] for i in chosen) <= capacity
    assert len(set(chosen)) == len(chosen)
    assert math.isclose(sum(values[i] for i in chosen), brute_force(values, costs, capacity), abs_tol=1e-9)


def test_knapsack_rejects_float_costs():
    with pytest.raises(ValueError, match="discretise"):
        adaptive.knapsack([1.0], [0.5], 1)


@pytest.mark.parametrize("seed", range(30))
def test_discretisation_never_exceeds_budget(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 10))
    costs = list(rng.uniform(0, 1, n) * 10.0 ** rng.uniform(-3, 9))      # MB .. FLOPs magnitudes
    capacity = float(rng.uniform(0, 1.2) * sum(costs))
    values = list(rng.uniform(0, 1, n))
    for max_units in (1, 7, 1000):
        ints, cap, unit = adaptive.discretise(costs, capacity, max_units)
        assert cap <= max_units
        chosen = adaptive.knapsack(values, ints, cap)
        exact = sum(Fraction(costs[i]) for i in chosen)
        assert exact <= Fraction(capacity) and math.fsum(costs[i] for i in chosen) <= capacity


def test_discretisation_of_integer_costs_is_exact():
    costs, capacity = [6.0, 9.0, 12.0, 15.0], 27.0     # gcd 3: nothing is rounded
    ints, cap, unit = adaptive.discretise(costs, capacity)
    assert (ints, cap, unit) == ([2, 3, 4, 5], 9, 3)
    values = [1.0, 2.0, 2.5, 3.1]
    chosen = adaptive.knapsack(values, ints, cap)
    assert math.isclose(sum(values[i] for i in chosen), brute_force(values, costs, capacity))


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("by", adaptive.GROUPINGS)
def test_groups_cover_every_splittable_site_once(ternary, by):
    sites = quant.splittable_sites(ternary[1])
    groups = adaptive.group_sites(sites, by)
    covered = [s for g in groups for s in g.sites]
    assert sorted(covered) == sorted(sites) and len(covered) == len(set(covered))
    names = [g.name for g in groups]
    expected = {"part_layer": [f"layer{i}.{p}" for i in range(L) for p in adaptive.PARTS],
                "layer": [f"layer{i}" for i in range(L)], "part": list(adaptive.PARTS)}[by]
    assert names[:len(expected)] == expected
    assert names[len(expected):] == [s for s in sites if adaptive.site_part(s)[0] is None]


def test_site_part():
    assert adaptive.site_part("bert.encoder.layers.3.attention.key") == ("qk", 3)
    assert adaptive.site_part("bert.encoder.layers.11.ffn.output") == ("ffn_out", 11)
    assert adaptive.site_part("bert.embeddings.word_embeddings") == (None, None)
    assert adaptive.site_part("bert.encoder.layers.0.ffn.output.input") == (None, None)


# ----------------------------------------------------------------------------- sensitivity
def test_assignment_scorer_matches_split_model(ternary):
    _, qmodel = ternary
    b = batch()
    sites = quant.splittable_sites(qmodel)
    seen = []
    score = adaptive.assignment_scorer(qmodel, sites, lambda m: seen.append(logits(m, b)) or 0.0)
    for split in ([], sites[:3], sites):
        score(split)
        split_model, _ = quant.split_model(qmodel, split)
        np.testing.assert_allclose(seen[-1], logits(split_model, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen[-1], logits(qmodel, b), rtol=1e-5, atol=1e-5)   # all split = ternary


def test_sensitivity_zero_when_quantization_is_identity(ternary):
    float_model, _ = ternary
    model = nnx.clone(float_model)
    v = model.bert.encoder.layers[0].attention.value.kernel
    v[...] = 0.3 * np.sign(np.asarray(v[...]) + 1e-9)       # +-c: TWN(w) == BWN(w) == w
    qmodel, _ = quant.quantize_model(model, quant.make_spec(2, 2, 8))
    groups = adaptive.group_sites(quant.splittable_sites(qmodel))
    b = batch()
    labels = np.array([0, 1, 2, 1])

    def score(m):   # minus cross-entropy
        z = logits(m, b)
        z = z - z.max(-1, keepdims=True)
        return float(np.mean(z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(-1))))

    for reference in adaptive.REFERENCES:
        base, sens = adaptive.sensitivity(qmodel, groups, score, reference=reference)
        assert sens["layer0.v"].gain == 0.0 and sens["layer0.v"].value == 0.0
        assert sens["layer0.v"].params == H * H
        others = [s.gain for name, s in sens.items() if name != "layer0.v"]
        assert all(g != 0.0 for g in others)
        assert all(math.isclose(s.value, s.gain / s.params) for s in sens.values())
    with pytest.raises(ValueError, match="reference"):
        adaptive.sensitivity(qmodel, groups, score, reference="float")


# ----------------------------------------------------------------------------- costs
def test_costs_match_cost_report_and_split_model(ternary):
    float_model, qmodel = ternary
    sites = quant.splittable_sites(qmodel)
    b = batch(2)
    binary = quant.cost_report(float_model, quant.make_spec(1, 1, 8), b)
    base, extra = adaptive.split_costs(qmodel, sites, "size_mb")
    assert math.isclose(base, binary.size_mb, rel_tol=1e-12)
    ternary_size = quant.cost_report(float_model, quant.make_spec(2, 2, 8), b).size_mb
    scales = sum(50 if "embeddings" in s else 1 for s in sites)    # per row / per tensor
    assert math.isclose(base + sum(extra.values()), ternary_size + 32 * scales / 8 / 2**20, rel_tol=1e-12)
    some = sites[1:6]
    split_some = quant.cost_report(float_model, quant.make_spec(2, 2, 8), b, split=some).size_mb
    assert math.isclose(base + sum(extra[s] for s in some), split_some, rel_tol=1e-12)
    for kind in ("flops", "bops"):
        base, extra = adaptive.split_costs(qmodel, sites, kind, b)
        assert math.isclose(base, getattr(binary, kind), rel_tol=1e-12)
        full = getattr(quant.cost_report(float_model, quant.make_spec(2, 2, 8), b, split=True), kind)
        assert math.isclose(base + sum(extra.values()), full, rel_tol=1e-12)


def test_split_costs_rejects_non_twn_sites(ternary):
    float_model, _ = ternary
    q8, _ = quant.quantize_model(float_model, quant.make_spec(8, 8, 8))
    with pytest.raises(ValueError, match="not TWN"):
        adaptive.split_costs(q8, ["bert.encoder.layers.0.attention.query"])


# ----------------------------------------------------------------------------- choosers
@pytest.mark.parametrize("seed", range(5))
def test_choose_split_respects_budget_and_knapsack_wins(ternary, seed):
    sites = quant.splittable_sites(ternary[1])
    groups = adaptive.group_sites(sites)
    rng = np.random.default_rng(seed)
    costs = {s: float(rng.integers(1, 40)) for s in sites}
    values = {g.name: float(rng.normal(1, 1)) for g in groups}
    total = sum(costs.values())
    for fraction in (0.0, 0.3, 0.6, 1.0):
        budget = 100.0 + fraction * total
        choices = {m: adaptive.choose_split(groups, values, costs, budget, base=100.0, method=m, seed=seed)
                   for m in adaptive.METHODS}
        for c in choices.values():
            assert c.cost <= budget - 100.0
            assert math.isclose(c.cost, sum(costs[s] for s in c.sites))
        assert choices["knapsack"].value >= max(c.value for c in choices.values()) - 1e-9
    layers = adaptive.choose_split(groups, values, costs, 100.0 + total, base=100.0, method="uniform",
                                   uniform_by="layer")
    assert sorted(layers.sites) == sorted(sites)


def test_uniform_splits_the_same_part_in_every_layer(ternary):
    sites = quant.splittable_sites(ternary[1])
    groups = adaptive.group_sites(sites)
    costs = {s: 1.0 for s in sites}
    c = adaptive.choose_split(groups, {}, costs, 2 * L + 1, method="uniform")   # qk = 2 sites per layer
    parts = [adaptive.site_part(s)[0] for s in c.sites]
    assert c.units[0] == "qk" and parts.count("qk") == 2 * L and set(parts) == {"qk", None}


def test_choose_split_errors(ternary):
    sites = quant.splittable_sites(ternary[1])
    groups = adaptive.group_sites(sites)
    costs = {s: 1.0 for s in sites}
    with pytest.raises(ValueError, match="below C0"):
        adaptive.choose_split(groups, {g.name: 1.0 for g in groups}, costs, 1.0, base=2.0)
    with pytest.raises(ValueError, match="no value"):
        adaptive.choose_split(groups, {}, costs, 10.0)


# ----------------------------------------------------------------------------- recipe
@pytest.fixture(scope="module")
def tiny_teacher_dir(make_tiny_model_dir):
    return make_tiny_model_dir(
        "tiny_adaptive_teacher", models.BertForSequenceClassification, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=64, num_labels=9)


def tiny_config(teacher_dir):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import binarybert_adaptive, binarybert_1_1_8
    config = binarybert_adaptive.get_config()
    config.teacher_dir = teacher_dir
    config.binarybert.finetune_steps = 1
    config.data.max_train_examples = 32
    config.data.max_length = 16
    config.adaptive.budgets = [0.0, 0.5, 1.0]
    config.adaptive.sensitivity_examples = 16
    config.train.update(dict(batch_size=8, eval_batch_size=128, log_every=1, async_checkpointing=False,
                             tensorboard=False, progress_bar=False))
    for stage in config.distill.stages:
        stage["num_steps"] = 1
    config.distill.stages[0]["matches"] = binarybert_1_1_8.intermediate_matches(layers=2)
    return config


@pytest.mark.slow
def test_recipe_family_on_a_tiny_model(tiny_teacher_dir, tmp_path):
    """End to end on a tiny teacher (minutes on a busy 2-core CPU: many small compilations)."""
    from efficient_nlp.recipes import adaptive_split
    results = adaptive_split.run(tiny_config(tiny_teacher_dir), str(tmp_path))
    rows = results["rows"]
    assert [(r["budget"], r["method"]) for r in rows] == [
        (f, m) for f in (0.0, 0.5, 1.0) for m in ("knapsack", "random", "uniform")]
    c0, full = results["budget_range"]["C0"], results["budget_range"]["C_full"]
    for r in rows:
        # The independent accounting of cost_report(split=sites) agrees with C0 + the chosen extras.
        assert r["size_mb"] == pytest.approx(r["cost"], rel=1e-9)
        assert r["cost"] <= c0 + r["budget"] * (full - c0) + 1e-12
    by = {(r["budget"], r["method"]): r for r in rows}
    assert by[(0.0, "knapsack")]["num_sites"] == 0 and by[(1.0, "random")]["size_mb"] == pytest.approx(full)
    # Everything split is the ternary function before fine-tuning.
    assert by[(1.0, "knapsack")]["before"]["accuracy"] == results["ternary"]["accuracy"]
    assert by[(0.5, "knapsack")]["value"] >= max(by[(0.5, m)]["value"] for m in ("random", "uniform")) - 1e-12
    assert set(results["sensitivity"]["groups"]) == {f"layer{i}.{p}" for i in range(2) for p in adaptive.PARTS} | {
        "bert.embeddings.word_embeddings", "bert.pooler.dense"}
    for name in ("results.json", "sensitivity.json", "accuracy_vs_size.png",
                 "half_width_ternary/packed/manifest.json"):
        assert (tmp_path / name).exists()
    # A second run reuses the saved ternary model: the same function (restored on the grid).
    config = tiny_config(tiny_teacher_dir)
    config.adaptive.budgets, config.adaptive.methods, config.binarybert.finetune_steps = [1.0], "knapsack", 0
    again = adaptive_split.run(config, str(tmp_path))
    assert again["ternary_source"].endswith("half_width_ternary/packed")
    assert again["ternary"]["accuracy"] == results["ternary"]["accuracy"]
    assert again["ternary"]["teacher_kl"] == pytest.approx(results["ternary"]["teacher_kl"], rel=1e-4, abs=1e-7)


def test_recipe_rejects_bad_configs(tiny_teacher_dir):
    from efficient_nlp.recipes import adaptive_split
    for key, value, match in (("budgets", [1.5], "budgets"), ("methods", "knapsack,greedy", "methods"),
                              ("reference", "float", "reference"),
                              ("cost", "latency", "cost"), ("by", "head", "by")):
        config = tiny_config(tiny_teacher_dir)
        config.adaptive[key] = value
        with pytest.raises(ValueError, match=match):
            adaptive_split.check_config(config)
