"""The pre-training recipe on tiny encoders and the built-in corpus: masked LM from scratch (held-out
loss falls, the saved model fine-tunes), ELECTRA (the discriminator is what is saved and loads as
a classifier), progressive stacking (the stage-2 model starts as the stacked stage-1 model; carry
copies the optimizer moments), config errors, and the compute section every recipe run gets."""
import json
import os
import sys

import numpy as np
import pytest

from efficient_nlp import models
from efficient_nlp.models.hf_checkpoint import named_params
from efficient_nlp.recipes import pretrain, run_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


def tiny_config(objective="mlm", steps=12, **stacking):
    from configs import pretrain_mlm
    config = pretrain_mlm.get_config()
    config.objective = objective
    config.tokenizer.vocab_size = 400
    config.model.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.data.update(block_size=32, max_documents=150, max_validation_documents=12)
    config.train.update(num_steps=steps, batch_size=8, eval_batch_size=16, learning_rate=3e-3, warmup_ratio=0.0,
                        log_every=4, eval_every=6, checkpoint_every=6, keep_checkpoints=0)
    if stacking:
        config.stacking.update(enabled=True, **stacking)
    return config


def test_mlm_from_scratch_learns_saves_and_reports_compute(tmp_path, capsys):
    config = tiny_config(steps=24)
    config.train.eval_every = 12
    results = run_recipe(config, str(tmp_path))
    curve = [p["loss"] for p in results["curve"]]
    assert len(curve) == 2 and curve[-1] < curve[0]
    assert results["curve"][-1]["flops"] == pytest.approx(results["training"]["flops"])
    assert results["training"]["stages"][0]["flops_per_step"] == pytest.approx(
        pretrain.step_flops(models.from_pretrained(str(tmp_path / "model"), head="mlm"), 8, 32))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["compute"]["energy_kwh"] > 0 and saved["compute"]["steps"] == 24
    # The saved masked LM loads as a classifier with the same encoder weights.
    clf = models.from_pretrained(str(tmp_path / "model"), num_labels=2)
    mlm_model = models.from_pretrained(str(tmp_path / "model"), head="mlm")
    a, b = named_params(clf), named_params(mlm_model)
    shared = [k for k in a if k in b and ".layers." in k]
    assert shared and all(np.array_equal(a[k].get_value(), b[k].get_value()) for k in shared)
    out = capsys.readouterr().out
    assert "Pre-trained from scratch (mlm)" in out and "data:" in out


def test_electra_saves_the_discriminator(tmp_path):
    results = run_recipe(tiny_config("electra", steps=6), str(tmp_path))
    assert results["held_out"]["metric"] == "disc_loss"
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["model_type"] == "electra" and cfg["architectures"] == ["ElectraForPreTraining"]
    assert json.loads((tmp_path / "generator" / "config.json").read_text())["hidden_size"] < cfg["hidden_size"]
    clf = models.from_pretrained(str(tmp_path / "model"), num_labels=3)
    assert clf.config.model_type == "electra" and clf.config.num_labels == 3


@pytest.mark.parametrize("optimizer", ["carry", "reset"])
def test_stacking_grows_the_model_and_continues(tmp_path, optimizer):
    results = run_recipe(tiny_config(steps=12, first_steps=6, optimizer=optimizer), str(tmp_path))
    s1, s2 = results["training"]["stages"]
    assert (s1["layers"], s1["steps"], s2["layers"], s2["steps"]) == (1, 6, 2, 6)
    assert s1["flops_per_step"] < s2["flops_per_step"]
    assert results["architecture"]["num_hidden_layers"] == 2
    steps = [p["step"] for p in results["curve"]]
    assert steps == [6, 12] and results["curve"][1]["flops"] == pytest.approx(
        6 * s1["flops_per_step"] + 6 * s2["flops_per_step"])
    assert (tmp_path / "stage1" / "checkpoints").is_dir() and (tmp_path / "stage2" / "checkpoints").is_dir()


def test_rerun_in_the_same_workdir_resumes_and_gives_the_same_model(tmp_path):
    config = tiny_config(steps=6)
    first = run_recipe(config, str(tmp_path))
    again = run_recipe(tiny_config(steps=6), str(tmp_path))  # complete: restores, trains nothing
    assert again["held_out"]["after"] == first["held_out"]["after"]


@pytest.mark.parametrize("change, message", [
    (dict(objective="bert"), "config.objective"),
    (dict(stacking=dict(enabled=True, first_steps=0)), "first_steps"),
    (dict(stacking=dict(enabled=True, first_steps=3, optimizer="keep")), "'carry' or 'reset'"),
    (dict(model=dict(num_hidden_layers=3), stacking=dict(enabled=True, first_steps=3)), "even"),
    (dict(objective="electra", model_dir="default"), "from scratch"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    config = tiny_config()
    for key, value in change.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with pytest.raises(ValueError, match=message):
        run_recipe(config, str(tmp_path))
