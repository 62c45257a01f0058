"""The distillation recipe end to end: a tiny model (fast) and the real MiniLM (slow)."""
import json
import os
import sys

import pytest

from efficient_nlp import distill, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


@pytest.fixture(scope="module")
def tiny_teacher_dir(make_tiny_model_dir):
    return make_tiny_model_dir(
        "tiny_teacher", models.BertForSequenceClassification, hidden_size=16,
        num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=9)


def tiny_config(teacher_dir, method="kd"):
    from configs import distill_theseus, distill_two_stage
    config = (distill_theseus if method == "theseus" else distill_two_stage).get_config()
    config.teacher_dir = teacher_dir
    config.data.max_train_examples = 64
    config.data.max_length = 16
    config.student.layers = (0, 2)
    config.train.update(dict(batch_size=8, eval_batch_size=128, eval_every=0, checkpoint_every=0,
                             log_every=2, async_checkpointing=False, tensorboard=False,
                             num_steps=3))
    config.distill.cache_teacher_logits = True
    config.distill.stages = [
        dict(name="intermediate", num_steps=2, learning_rate=1e-3, hard_label_weight=0.0,
             matches=distill.layer_matches("hidden", "hidden_mse", [(2, 4)])),
        dict(name="prediction", num_steps=2, learning_rate=1e-3, hard_label_weight=0.5,
             matches=[dict(feature="logits", loss="kl", temperature=2.0, t2_scale=True)]),
    ]
    return config


@pytest.mark.slow
def test_two_stage_recipe_writes_results_and_student(tiny_teacher_dir, tmp_path):
    from efficient_nlp.recipes import run_recipe
    config = tiny_config(tiny_teacher_dir)
    config.distill.stages[1]["num_steps"] = 1
    results = run_recipe(config, str(tmp_path))
    assert set(results["stages"]) == {"intermediate", "prediction"}
    for key in ("accuracy", "loyalty", "teacher_kl"):
        assert key in results["student"]
    assert results["teacher"]["loyalty"] == 1.0
    assert results["size"]["student_params"] < results["size"]["teacher_params"]
    assert results["size"]["speedup"] > 0
    assert json.load(open(tmp_path / "results.json")) == results
    assert (tmp_path / "teacher_logits.npz").exists()
    student = models.from_pretrained(str(tmp_path / "student"), num_labels=9)
    assert student.config.num_hidden_layers == 2
    metrics = [json.loads(line) for line in open(tmp_path / "stage_intermediate" / "metrics.jsonl")]
    assert any("distill/hidden2_4/hidden_mse" in r for r in metrics)
    assert any("eval/loyalty" in r for r in metrics)


@pytest.mark.slow
def test_theseus_recipe_runs(tiny_teacher_dir, tmp_path):
    from efficient_nlp.recipes import run_recipe
    config = tiny_config(tiny_teacher_dir, "theseus")
    config.baseline.enabled = True
    config.distill.replace_rate = dict(kind="linear", start=0.5, end=1.0, steps=2)
    results = run_recipe(config, str(tmp_path))
    assert "theseus" in results["stages"] and "accuracy" in results["student"]
    assert "loyalty" in results["baseline"]


def test_student_init_pretrained_copies_the_pretrained_layers(tiny_teacher_dir, tmp_path):
    """``student.init="pretrained"``: the student's layers come from ``model_dir`` (not the teacher);
    an unknown init fails at config time."""
    import numpy as np
    from flax import nnx
    from efficient_nlp.recipes import distill as recipe
    pretrained = str(tmp_path / "pretrained")   # same shapes as the teacher, other weights
    models.save_hf_checkpoint(models.BertModel(models.BertConfig.from_pretrained(tiny_teacher_dir),
                                               rngs=nnx.Rngs(1)), pretrained)
    config = tiny_config(tiny_teacher_dir)
    config.model_dir = pretrained
    teacher = models.from_pretrained(tiny_teacher_dir, num_labels=9)
    source = models.from_pretrained(pretrained, num_labels=9)
    name = "bert.encoder.layers.{}.attention.query.kernel"
    for init, expected in (("teacher", teacher), ("pretrained", source)):
        config.student.init = init
        recipe.check_config(config)
        student = distill.student_from_teacher(recipe._student_source(config, teacher, 9), (0, 2))
        np.testing.assert_array_equal(models.named_params(student)[name.format(1)].get_value(),
                                      models.named_params(expected)[name.format(2)].get_value())
    assert not np.array_equal(models.named_params(teacher)[name.format(2)].get_value(),
                              models.named_params(source)[name.format(2)].get_value())
    config.student.init = "random"
    with pytest.raises(ValueError, match="config.student.init='random'"):
        recipe.check_config(config)


def test_transfer_set_keeps_labels_on_a_seeded_subset_and_checks_its_size(tiny_teacher_dir):
    import numpy as np
    from efficient_nlp.recipes import distill as recipe
    rows = recipe.labelled_subset(100, 10, seed=3)
    assert len(rows) == len(set(rows.tolist())) == 10 and list(rows) == sorted(rows) and rows.max() < 100
    np.testing.assert_array_equal(rows, recipe.labelled_subset(100, 10, seed=3))
    assert not np.array_equal(rows, recipe.labelled_subset(100, 10, seed=4))
    with pytest.raises(ValueError, match="the training split has 100 examples; use 1..100"):
        recipe.labelled_subset(100, 101, seed=0)
    config = tiny_config(tiny_teacher_dir)
    config.distill.labelled_examples = -1
    with pytest.raises(ValueError, match="labelled_examples=-1"):
        recipe.check_config(config)
    config = tiny_config(tiny_teacher_dir, "theseus")
    config.distill.labelled_examples = 16
    with pytest.raises(ValueError, match="needs method='kd'"):
        recipe.check_config(config)


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_transfer_set_recipe_distils_on_every_text_and_trains_the_baseline_on_the_labelled(
        tiny_teacher_dir, tmp_path):
    from efficient_nlp.recipes import run_recipe
    config = tiny_config(tiny_teacher_dir)
    config.distill.labelled_examples = 16
    config.baseline.enabled = True
    results = run_recipe(config, str(tmp_path))
    assert results["transfer_set"] == {"labelled": 16, "texts": 64}
    assert "accuracy" in results["baseline"] and "accuracy" in results["student"]


def test_recipe_rejects_bad_match_before_training(tiny_teacher_dir, tmp_path):
    from efficient_nlp.recipes import run_recipe
    config = tiny_config(tiny_teacher_dir)
    config.distill.stages[0]["matches"][0]["teacher_layer"] = 9
    with pytest.raises(ValueError, match=r"intermediate.*teacher_layer=9 is out of range"):
        run_recipe(config, str(tmp_path))
    assert not os.listdir(tmp_path)
    config = tiny_config(tiny_teacher_dir)
    config.distill.stages[1]["matches"][0]["feature"] = "logitz"
    with pytest.raises(ValueError, match="unknown feature 'logitz'"):
        run_recipe(config, str(tmp_path))


@pytest.mark.slow  # ~10 min on 2 CPU cores (plus the teacher's fine-tuning when the session has not done it)
def test_distilled_student_beats_labels_only_student_with_a_transfer_set(finetuned_minilm_dir, tmp_path):
    """configs/distill_transfer.py: 256 of the 2,016 training texts labelled; the 2-layer student
    distilled on every text (teacher logits) must beat the same student trained on the 256
    labelled texts for the same 400 steps, by at least 3 points of dev accuracy (seed 0: 0.801
    vs the baseline in docs/distillation.md)."""
    from configs import distill_transfer
    from efficient_nlp.recipes import run_recipe
    config = distill_transfer.get_config()
    config.teacher_dir = finetuned_minilm_dir
    config.train.update(dict(progress_bar=False, eval_every=0, checkpoint_every=0))
    results = run_recipe(config, str(tmp_path))
    print(json.dumps({k: results[k] for k in ("teacher", "student", "baseline", "transfer_set")}, indent=2))
    assert results["transfer_set"] == {"labelled": 256, "texts": 2016}
    assert results["student"]["accuracy"] >= results["baseline"]["accuracy"] + 0.03, results
    assert results["student"]["loyalty"] > results["baseline"]["loyalty"]


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "Not reached yet. Teacher (configs/quickstart.py) 0.811 dev accuracy; the same "
    "3-layer student (teacher layers 0, 2, 4) trained on labels for 400 steps at 1e-4: 0.801. "
    "Distilled for the same 400 steps: two-stage (this config) 0.768; Hinton KD on logits "
    "(KL at T=2 times T^2 + 0.5 hard labels, 400 steps) 0.787; one stage with hidden-state MSE "
    "+ that KD loss 0.792 (2026-11-21, fixed seeds; the baseline number is from the first run). "
    "Student initialised from the pretrained (not fine-tuned) MiniLM layers 0, 2, 4 "
    "(student.init='pretrained'), 400 steps each: that one-stage KD 0.757 (loyalty 0.860, KL 0.127) "
    "vs labels only 0.771 (loyalty 0.849, KL 0.236); at step 200: 0.747 vs 0.733."))
def test_distilled_student_beats_undistilled_student(finetuned_minilm_dir, tmp_path):
    """The real two-stage recipe: fine-tuned MiniLM-L6 teacher (the session's shared
    ``finetuned_minilm_dir``) -> 3-layer student.

    Fixed seeds; the distilled student must beat the same student trained on the task
    loss alone for the same number of steps (about 15-25 minutes on 2 CPU cores, plus the
    teacher's fine-tuning when the session has not done it yet).
    """
    from configs import distill_two_stage
    from efficient_nlp.recipes import run_recipe
    config = distill_two_stage.get_config()
    config.teacher_dir = finetuned_minilm_dir
    config.baseline.enabled = True
    config.train.progress_bar = False
    results = run_recipe(config, str(tmp_path))
    print(json.dumps(results, indent=2))
    teacher = results["teacher"]["accuracy"]
    student, baseline = results["student"]["accuracy"], results["baseline"]["accuracy"]
    assert teacher > 0.6
    assert student > baseline, results
    assert results["size"]["speedup"] > 1.3
