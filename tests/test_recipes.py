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
    config.train.update({**dict(num_steps=60, batch_size=32, learning_rate=1e-2, eval_every=30,
                                checkpoint_every=30, log_every=10, async_checkpointing=False,
                                tensorboard=False), **train})
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


def test_cli_runs_a_tiny_finetune(tiny_model_dir, tmp_path):
    proc = run_cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
                   f"--config.model_dir={tiny_model_dir}", "--config.data.max_train_examples=64",
                   "--config.data.max_length=16", "--config.train.num_steps=4",
                   "--config.train.batch_size=8", "--config.train.eval_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout and "before" in proc.stdout
    assert f"| workdir {tmp_path}" in proc.stdout and "data: builtin, 64 train" in proc.stdout
    assert f"wrote: {tmp_path}" in proc.stdout and "efficient_nlp_data.json" in os.listdir(tmp_path / "model")
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


def test_a_teacher_fine_tuned_on_your_csv_brings_its_data_and_class_names_to_compression(
        tiny_model_dir, tmp_path, capsys):
    import csv
    import random

    from efficient_nlp import data
    from efficient_nlp.recipes import run_recipe
    from test_qat_recipe import tiny_config

    rng = random.Random(0)
    words = {"sport": "goal match team", "money": "bank price loan", "music": "song band guitar"}
    for split, n in (("train", 48), ("dev", 12)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "topic"])
            for i in range(n):
                topic = list(words)[i % 3]
                writer.writerow([" ".join(rng.choices(words[topic].split(), k=5)), topic])
    ft = quickstart_config(tiny_model_dir, num_steps=4, eval_every=0, checkpoint_every=0)
    ft.data.update(dict(task="files", train_file=str(tmp_path / "train.csv"),
                        dev_file=str(tmp_path / "dev.csv"), text_a="sentence", label="topic",
                        max_train_examples=0))
    run_recipe(ft, str(tmp_path / "ft"))
    teacher_dir = tmp_path / "ft" / "model"
    saved = data.load_data_settings(str(teacher_dir))
    assert saved["label_names"] == ("money", "music", "sport") and saved["num_labels"] == 3
    assert json.load(open(teacher_dir / "config.json"))["id2label"] == {"0": "money", "1": "music", "2": "sport"}

    config = tiny_config(str(teacher_dir))       # data section untouched but for its sizes
    capsys.readouterr()
    results = run_recipe(config, str(tmp_path / "qat"))
    out = capsys.readouterr().out
    assert "data: the settings saved with the model" in out and "48 train / 12 dev examples" not in out
    assert "32 train / 12 dev examples of up to 16 tokens" in out       # its own sizes are kept
    assert results["task"] == "files" and config.data.train_file == str(tmp_path / "train.csv")
    assert config.data.max_length == 16 and config.data.num_labels == 3
