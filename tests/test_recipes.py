"""End-to-end wiring: train.py -> recipe -> data -> model -> fit, on a tiny model.

The tiny model uses the embedded MiniLM's tokenizer (skipped without it); the real
quickstart on the pretrained MiniLM is the slow test at the bottom.
"""
import json
import os
import subprocess
import sys

import pytest

from efficient_nlp import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


@pytest.fixture(scope="module")
def tiny_model_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_bert", hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=128)


def quickstart_config(model_dir, **train):
    from configs import quickstart
    config = quickstart.get_config()
    config.model_dir = model_dir
    config.data.max_train_examples = 512
    config.data.max_length = 32
    config.train.update(dict(num_steps=60, batch_size=32, learning_rate=1e-2, eval_every=30,
                             checkpoint_every=30, log_every=10, async_checkpointing=False,
                             tensorboard=False, **train))
    return config


def test_finetune_recipe_learns_and_writes_outputs(tiny_model_dir, tmp_path):
    from efficient_nlp.recipes import run_recipe
    results = run_recipe(quickstart_config(tiny_model_dir), str(tmp_path))

    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [30, 60]
    assert losses[-1] < losses[0] - 0.3, losses  # the loss goes down
    assert results["train_examples"] == 512 and results["dev_examples"] > 300
    assert results["dev_after"]["accuracy"] > results["dev_before"]["accuracy"]
    assert json.load(open(tmp_path / "results.json")) == results
    assert results["latency_ms"] > 0 and "batch 1 x 32 tokens" in results["latency_note"]
    # The saved fine-tuned model reloads with its head and gives the reported accuracy.
    reloaded = models.from_pretrained(str(tmp_path / "model"), num_labels=9)
    from efficient_nlp import data, train
    task = data.load_task_data("builtin", tokenizer_dir=str(tmp_path / "model"), max_length=32)
    eval_fn = train.make_eval_fn(task.dev, 128, lambda p, y, w: data.compute_metrics(
        task.spec, p, y, w))
    assert eval_fn(reloaded)["accuracy"] == pytest.approx(results["dev_after"]["accuracy"])


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_rejects_unknown_config_key(tmp_path):
    proc = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                   "--config.train.num_stepz=3")
    assert proc.returncode != 0
    assert "num_stepz" in proc.stderr


def test_cli_rejects_unknown_recipe(tmp_path):
    proc = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                   "--config.recipe=qat_nonexistent")
    assert proc.returncode != 0
    assert "Unknown recipe 'qat_nonexistent'" in proc.stderr and "finetune" in proc.stderr


def test_cli_runs_a_tiny_finetune(tiny_model_dir, tmp_path):
    proc = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                   f"--config.model_dir={tiny_model_dir}", "--config.data.max_train_examples=64",
                   "--config.data.max_length=16", "--config.train.num_steps=4",
                   "--config.train.batch_size=8", "--config.train.eval_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "before" in proc.stdout
    assert (tmp_path / "checkpoints" / "4").is_dir()


@pytest.mark.slow
def test_quickstart_fine_tunes_minilm_well(tmp_path):
    """The real quickstart: pretrained MiniLM on the built-in task (~10 min on 2 cores)."""
    from configs import quickstart
    from efficient_nlp.recipes import run_recipe
    results = run_recipe(quickstart.get_config(), str(tmp_path))
    before, after = results["dev_before"]["accuracy"], results["dev_after"]["accuracy"]
    assert after > 0.6 and after > before + 0.3, results
    assert after < 1.0  # the task is not trivial
