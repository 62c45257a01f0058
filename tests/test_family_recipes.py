"""Every recipe runs on every encoder family: a few steps on a tiny RoBERTa and a tiny DistilBERT
(the heavy recipes run one family by default and the other with ``-m slow``).

The tiny configs are the ones the per-recipe tests use on BERT; here each recipe gets a teacher /
model directory of another family and must produce what it produces for BERT: a saved model of
the same family that loads back, the same accounting, finite results.
"""
import json
import os
import sys

import numpy as np
import pytest

from efficient_nlp import data as data_lib
from efficient_nlp import models
from efficient_nlp.models import family as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root

FAMILIES = {
    # The tiny dirs use the embedded MiniLM's WordPiece tokenizer (pad id 0), so RoBERTa's padding
    # index is 0 here; its positions then start at 1.
    "roberta": dict(model_type="roberta", pad_token_id=0, type_vocab_size=1),
    "distilbert": dict(model_type="distilbert", type_vocab_size=0),
}


@pytest.fixture(scope="module")
def family_dir(make_tiny_model_dir):
    """``family_dir(name, layers=2)``: a tiny random sequence classifier of that family (cached)."""
    made = {}

    def make(name, layers=2):
        if (name, layers) not in made:
            made[name, layers] = make_tiny_model_dir(
                f"tiny_{name}_{layers}l", models.BertForSequenceClassification, hidden_size=16,
                num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=64, num_labels=9, **FAMILIES[name])
        return made[name, layers]

    return make


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def teacher_dir(request, family_dir):
    return family_dir(request.param)


def _both(fast: str | None):
    """Both families; those not named ``fast`` run with the slow tests (keeps the default suite
    short: the heavy recipes compile many steps; tests/test_quant_family.py covers REM / MREM and
    the integer path on both families in the default suite)."""
    return pytest.mark.parametrize("name", [
        pytest.param(n, marks=() if n == fast else pytest.mark.slow) for n in sorted(FAMILIES)])


def _family(model_dir) -> str:
    return json.load(open(os.path.join(model_dir, "config.json")))["model_type"]


def _train(config, **extra):
    config.train.update(dict(batch_size=8, eval_batch_size=128, eval_every=0, checkpoint_every=0, log_every=1,
                             async_checkpointing=False, tensorboard=False, progress_bar=False, **extra))
    config.data.max_train_examples = 32
    config.data.max_length = 16
    return config


def test_finetune(teacher_dir, tmp_path):
    from configs import quickstart
    from efficient_nlp.recipes import run_recipe
    config = _train(quickstart.get_config(), num_steps=2)
    config.model_dir = teacher_dir
    results = run_recipe(config, str(tmp_path))
    model = models.from_pretrained(str(tmp_path / "model"), num_labels=9)
    assert model.config.model_type == _family(teacher_dir)
    assert np.isfinite(results["dev_after"]["accuracy"])


@_both(fast="distilbert")
def test_distill_and_theseus(name, family_dir, tmp_path):
    from test_distill_recipe import tiny_config
    from efficient_nlp.recipes import run_recipe
    deep_teacher_dir = family_dir(name, layers=4)  # the configs map 2 student layers to 4
    for method in ("kd", "theseus"):
        results = run_recipe(tiny_config(deep_teacher_dir, method), str(tmp_path / method))
        student = models.from_pretrained(str(tmp_path / method / "student"), num_labels=9)
        assert student.config.model_type == _family(deep_teacher_dir)
        assert F.num_layers(student) == 2
        assert np.isfinite(results["student"]["accuracy"])


@_both(fast="roberta")
def test_qat(name, family_dir, tmp_path):
    teacher_dir = family_dir(name)
    from test_qat_recipe import tiny_config
    from efficient_nlp.recipes import run_recipe
    results = run_recipe(tiny_config(teacher_dir, (2, 2, 8)), str(tmp_path))
    fp, q = results["cost"]["full_precision"], results["cost"]["quantized"]
    assert q["params"] == fp["params"] and q["flops"] == fp["flops"]
    assert q["size_mb"] < fp["size_mb"] / 3


@_both(fast=None)
def test_ptq(name, family_dir, tmp_path):
    teacher_dir = family_dir(name)
    from test_ptq import tiny_config
    from efficient_nlp.recipes import run_recipe
    results = run_recipe(tiny_config(teacher_dir, method="rem,mrem_s"), str(tmp_path))
    assert [r["layers"] for r in results["reports"]["mrem_s"]] == [[0, 1], [1, 2]]
    for method in ("rem", "mrem_s"):
        assert np.isfinite(results["after"][method]["accuracy"])


@_both(fast=None)
def test_binarybert(name, family_dir, tmp_path):
    teacher_dir = family_dir(name)
    from test_binarybert_recipe import tiny_config
    from efficient_nlp.recipes import run_recipe
    results = run_recipe(tiny_config(teacher_dir, method="tws"), str(tmp_path))
    assert results["half_width"]["heads"] == [1, 1] and results["half_width"]["neurons"] == [16, 16]
    assert all(np.isfinite(row["accuracy"]) for row in results["rows"].values())


def test_prune_structured_shrinks_to_the_same_family(teacher_dir, tmp_path):
    from configs import prune_structured
    from efficient_nlp.recipes import run_recipe
    config = _train(prune_structured.get_config("0.5"), num_steps=4)
    config.model_dir = teacher_dir
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=0, end_step=2, frequency=1)
    config.prune.measure_latency = False
    results = run_recipe(config, str(tmp_path))
    shrunk = models.from_pretrained(str(tmp_path / "model_shrunk"), num_labels=9)
    assert shrunk.config.model_type == _family(teacher_dir)
    assert [F.head_layout(shrunk, i).num_heads for i in range(2)] == [1, 1]
    assert results["shrink"]["dev_shrunk"] == pytest.approx(results["dev_after"])


def test_cross_distill(teacher_dir, tmp_path):
    from configs import cd_bert
    from efficient_nlp.recipes import cross_distill
    config = cd_bert.get_config()
    config.teacher_dir = teacher_dir
    config.data.update(dict(max_length=16, max_train_examples=64))
    config.update(dict(sparsities=(0.7,), shots=(1,), seeds=(0,), methods=("l1", "cd"), error_examples=8,
                       max_eval_examples=32))
    config.cd.steps = 2
    results = cross_distill.run(config, str(tmp_path))
    assert {r["method"] for r in results["runs"]} == {"l1", "cd"}
    assert all(r["layer_sparsity"] and min(r["layer_sparsity"].values()) >= 0.69 for r in results["runs"])


def test_builtin_task_tokenises_for_the_family(teacher_dir):
    task = data_lib.load_task_data("builtin", tokenizer_dir=teacher_dir, max_length=16)
    model = models.from_pretrained(teacher_dir, num_labels=9)
    out = F.forward(model, {k: v[:4] for k, v in task.dev.items()})
    assert out.logits.shape == (4, 9) and np.all(np.isfinite(out.logits))
