"""The ``early_exit`` and ``token_skip`` recipes end to end on a tiny teacher: two-stage training
leaves the full model exactly the teacher, the operating points are sweep points, and the saved
models reload into the decisions the recipe measured; bad settings fail before anything runs."""
import importlib
import os

import numpy as np
import pytest

from efficient_nlp import data as data_lib
from efficient_nlp import models, train
from efficient_nlp.dynamic import exit_rules, exits, tokens
from efficient_nlp.recipes import run_recipe
from efficient_nlp.recipes import early_exit as early_exit_recipe
from efficient_nlp.recipes import token_skip as token_skip_recipe
from efficient_nlp.recipes.common import load_data
from efficient_nlp.recipes.token_skip import work_fraction


def _tiny(config, teacher_dir):
    config.teacher_dir = teacher_dir
    config.data.update(dict(max_length=16, max_train_examples=64))
    config.train.update(dict(num_steps=3, batch_size=8, eval_batch_size=32, eval_every=0, checkpoint_every=0,
                             progress_bar=False, tensorboard=False))
    return config


@pytest.fixture(scope="module")
def teacher_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_dynamic_teacher", model_cls=models.BertForSequenceClassification, hidden_size=32,
                               num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=32, num_labels=9)


def test_early_exit_recipe_keeps_the_teacher_and_saves_what_it_measured(teacher_dir, tmp_path):
    config = _tiny(importlib.import_module("configs.early_exit").get_config(), teacher_dir)
    config.early_exit.update(dict(rules="entropy,patience", timing_examples=4, timing_batch=4, rounds=1))
    config.early_exit.thresholds.update(dict(entropy="0.5,1.0", patience="1,2"))
    results = run_recipe(config, str(tmp_path))
    assert results["full_accuracy"] == results["teacher_accuracy"]  # two-stage: the backbone is frozen
    for name, r in results["rules"].items():
        assert all(p in r["points"] for p in r["operating_points"].values())
        assert all(1 <= p["mean_layers"] <= 3 and p["speedup_b1"] > 0 for p in r["points"])
    patience = results["rules"]["patience"]["points"]
    assert patience[0]["mean_layers"] == 1.0 and patience[0]["exits"]["2"] == patience[0]["exits"]["3"] == 0
    model, rule = exits.load(os.path.join(tmp_path, "model"))
    chosen = early_exit_recipe.saved_point(results["rules"]["entropy"]["operating_points"])
    assert rule == exit_rules.Entropy(chosen["threshold"])
    task = load_data(config, teacher_dir)
    z = np.transpose(train.predict(model, task.dev, 32, predict_fn=early_exit_recipe._all_exit_logits), (1, 0, 2))
    decision = exit_rules.simulate(z, rule, model.exit_layers)
    assert decision.mean_layers() == pytest.approx(chosen["mean_layers"])
    assert data_lib.compute_metrics(task.spec, decision.logits, task.dev["labels"])["accuracy"] == pytest.approx(
        chosen["accuracy"])


def test_token_skip_recipe_sweeps_monotone_work_and_saves_the_learned_schedule(teacher_dir, tmp_path):
    config = _tiny(importlib.import_module("configs.token_skip_power").get_config(), teacher_dir)
    config.token_skip.update(dict(soft_steps=3, hard_steps=2, scales="0.25,1", timing_examples=4, timing_batch=4,
                                  rounds=1))
    results = run_recipe(config, str(tmp_path))
    low, high = results["points"]
    assert low["work"] <= high["work"] <= 1.0                       # fewer tokens kept at the lower scale
    assert all(a >= b for a, b in zip(results["learned"], results["learned"][1:]))  # non-increasing counts
    model = tokens.load(os.path.join(tmp_path, "model"))
    assert tuple(model.token_skip.counts) == tuple(results["learned"])
    task = load_data(config, teacher_dir)
    scaled = tokens.set_counts(model, tuple(high["setting"]))
    logits, kept = train.predict(scaled, task.dev, 32, predict_fn=token_skip_recipe._hard)
    assert float(np.mean(work_fraction(kept, task.dev["attention_mask"]))) == pytest.approx(high["work"])
    assert data_lib.compute_metrics(task.spec, logits, task.dev["labels"])["accuracy"] == pytest.approx(high["accuracy"])


@pytest.mark.parametrize("module, field, value, match", [
    ("early_exit", "rules", "entropy,gready", "unknown rule"),
    ("early_exit", "training", "three_stage", "training"),
    ("early_exit", "pooling", "max", "pooling"),
    ("token_skip", "method", "topk", "method"),
    ("token_skip", "scales", "1,-1", "scales"),
])
def test_bad_settings_fail_at_config_time(module, field, value, match):
    config = importlib.import_module(f"configs.{module}").get_config()
    getattr(config, module)[field] = value
    recipe = early_exit_recipe if module == "early_exit" else token_skip_recipe
    with pytest.raises(ValueError, match=match):
        recipe.check_config(config)


def test_timing_inputs_are_trimmed_and_the_reference_is_the_model():
    import _tiny
    from efficient_nlp.dynamic import sweep
    from efficient_nlp.models import family as F

    b = _tiny.token_batch(3, 16, 50)
    b["attention_mask"][:, 11:] = 0                  # longest row: 11 tokens -> the bucket of 16 stays 16
    assert sweep.trim(b)["input_ids"].shape == (3, 16)
    b["attention_mask"][:, 7:] = 0                   # 7 tokens -> bucket 8
    cut = sweep.trim(b)
    assert cut["input_ids"].shape == (3, 8) and set(cut) == {"input_ids", "attention_mask", "token_type_ids"}
    arrays = dict(b, labels=np.zeros(3, np.int32))
    assert [x["input_ids"].shape[0] for x in sweep.timing_batches(arrays, 3, 2)] == [2, 1]
    model = _tiny.tiny_bert()
    np.testing.assert_allclose(sweep.full_model_fn(model)(cut), np.asarray(F.forward(model, cut).logits),
                               rtol=1e-6, atol=1e-6)
    points = [{"speedup_b1": 1.2, "accuracy": 0.8}, {"speedup_b1": 1.6, "accuracy": 0.7},
              {"speedup_b1": 1.3, "accuracy": 0.75}, {"speedup_b1": 2.1, "accuracy": 0.6}]
    chosen = sweep.operating_points(points, full_accuracy=0.8)
    assert chosen["1.5x"] is points[1] and chosen["2x"] is points[3]
    assert chosen["within 0.01"] is points[0]                    # the only point within one point
    assert "within 0.01" not in sweep.operating_points(points, full_accuracy=0.9)
