"""The BinaryBERT recipe end to end: a tiny teacher (fast) and the real MiniLM at 1-1-8 (slow)."""
import json
import os
import sys

import numpy as np
import pytest

from efficient_nlp import models, quant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


@pytest.fixture(scope="module")
def tiny_teacher_dir(make_tiny_model_dir):
    return make_tiny_model_dir(
        "tiny_binarybert_teacher", models.BertForSequenceClassification, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
        max_position_embeddings=64, num_labels=9)


def tiny_config(teacher_dir, a_bits=8, activation_method="uniform", method="tws,bwn"):
    from configs import binarybert_1_1_8
    config = binarybert_1_1_8.get_config(a_bits, activation_method)
    config.teacher_dir = teacher_dir
    config.binarybert.method = method
    config.binarybert.finetune_steps = 2
    config.data.max_train_examples = 32
    config.data.max_length = 16
    config.train.update(dict(batch_size=8, eval_batch_size=128, log_every=1, async_checkpointing=False,
                             tensorboard=False, progress_bar=False))
    for stage in config.distill.stages:
        stage["num_steps"] = 2
    config.distill.stages[0]["matches"] = binarybert_1_1_8.intermediate_matches(layers=2)
    return config


@pytest.mark.slow  # ~2 min on 2 cores: seven compiled training stages
def test_recipe_produces_every_row_with_consistent_costs(tiny_teacher_dir, tmp_path):
    """Both pipelines at 1-1-4 with LSQ activations (calibrated once, kept through the split)."""
    from efficient_nlp.recipes import run_recipe
    from efficient_nlp.recipes.binarybert import ROWS
    results = run_recipe(tiny_config(tiny_teacher_dir, 4, "lsq"), str(tmp_path))
    rows = results["rows"]
    assert list(rows) == [name for name, _ in ROWS]
    assert results["half_width"]["heads"] == [2, 2] and results["half_width"]["neurons"] == [16, 16]
    fp, tern, split, tws, bwn = (rows[n] for n, _ in ROWS)
    assert [r["bits"] for r in (fp, tern, split, tws, bwn)] == ["32-32-32", "2-2-4", "1-1-4", "1-1-4", "1-1-4"]
    # The split model computes the ternary model's function (before fine-tuning): same predictions.
    assert split["accuracy"] == tern["accuracy"] and split["loyalty"] == tern["loyalty"]
    assert split["teacher_kl"] == pytest.approx(tern["teacher_kl"], rel=1e-4, abs=1e-7)
    # Splitting doubles the half-width matrices: the linear layers cost what the full-width BWN's
    # do; only the activation-activation attention matmuls stay half width.
    assert tern["flops"] < tws["flops"] < bwn["flops"] < fp["flops"] * 1.01
    assert tern["params"] < fp["params"] < tws["params"]   # the split word embedding is two tables
    assert bwn["size_mb"] < tws["size_mb"] < 2 * tern["size_mb"] < fp["size_mb"]
    for r in (tern, tws, bwn):   # the files add only the safetensors header and the manifest
        assert 0 < r["packed_mb"] - r["size_mb"] < 0.1
    assert set(results["stages"]["tws"]) == {"intermediate", "prediction", "finetune"}
    assert set(results["stages"]["bwn"]) == {"intermediate", "prediction"}
    # Same total steps: the baseline's last stage also took the fine-tuning steps.
    steps = [json.loads(line).get("step", 0) for line in open(tmp_path / "bwn" / "stage_prediction" / "metrics.jsonl")]
    assert max(steps) == 4 and results["total_steps"] == 6
    assert json.load(open(tmp_path / "results.json")) == results
    manifest = quant.load_packed(tmp_path / "tws" / "packed")["manifest"]
    assert {e["pack_bits"] for e in manifest["weights"].values()} == {1}
    assert len(manifest["weights"]) == 2 * 14       # word embedding, 2 x 6 layer matrices, pooler


def test_bad_configs_fail_before_training(tiny_teacher_dir, tmp_path):
    from configs import qat_2_2_8
    from efficient_nlp.recipes import run_recipe
    config = tiny_config(tiny_teacher_dir, method="tws,bnw")
    with pytest.raises(ValueError, match="'tws', 'bwn' or 'tws,bwn'"):
        run_recipe(config, str(tmp_path))
    config = tiny_config(tiny_teacher_dir)
    config.distill.stages[0]["matches"] = qat_2_2_8.intermediate_matches(layers=2)   # attention scores
    with pytest.raises(ValueError, match="attn_scores cannot be matched"):
        run_recipe(config, str(tmp_path))
    config = tiny_config(tiny_teacher_dir)
    config.binarybert.score = "movement"
    with pytest.raises(ValueError, match="score='movement'"):
        run_recipe(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_half_width_structure_keeps_the_top_half_per_layer():
    from efficient_nlp.recipes.binarybert import bwn_stages, half_width_structure
    scores = {"heads": [np.array([3.0, 1.0, 2.0, 0.5]), np.array([1.0, 1.0, 1.0, 1.0])],
              "neurons": [np.arange(6.0), np.array([5.0, 0.0, 4.0, 1.0, 3.0, 2.0])]}
    st = half_width_structure(scores, 0.5)
    assert st == {"layers": [0, 1], "heads": [[0, 2], [0, 1]], "neurons": [[3, 4, 5], [0, 2, 4]]}
    stages = [dict(name="a", num_steps=10), dict(name="b", num_steps=5)]
    assert [s["num_steps"] for s in bwn_stages(stages, 7)] == [10, 12] and stages[1]["num_steps"] == 5
    with pytest.raises(ValueError, match="width"):
        half_width_structure(scores, 0.0)


@pytest.mark.slow
@pytest.mark.xfail(reason="at 90 steps per pipeline the BWN baseline is ahead (measured 0.628 vs TWS 0.561; "
                          "at 300 steps, 100 per stage: BWN 0.741 vs TWS 0.706, half-width ternary 0.701); "
                          "the half-width model loses more to pruning than it gains from ternary training", strict=False)
def test_tws_beats_bwn_at_1_1_8_on_minilm(finetuned_minilm_dir, tmp_path):
    """configs/binarybert_1_1_8.py on the real fine-tuned MiniLM, seed 0, at the step counts that
    fit a shared 2-core CPU: TWS 30 + 30 ternary steps + 30 split fine-tuning steps, BWN 30 + 60.
    The published direction is TWS > BWN at equal bits (BinaryBERT Table 5.2).

    Measured 2026-11-21 (seed 0, 2 shared CPU cores, ~48 min; dev accuracy / packed MB / BOPs G per
    example at T = 64): full precision 0.811 / 86.7 (fp32) / 1.397; half-width pruned FP, untrained
    0.609; half-width ternary 2-2-8 untrained 0.267, after stage 1 0.515, after stage 2 0.563 /
    5.14 / 0.189; TWS split before fine-tuning 0.558 (the same function; 8-bit activation rounding
    flips 2 of 371 predictions), after fine-tuning 0.561 / 5.30 / 0.189; BWN 1-1-8 after stage 1
    0.332, after stage 2 0.628 / 3.76 / 0.208.  The published direction does NOT hold at these step
    counts (xfail).
    """
    from configs import binarybert_1_1_8
    from efficient_nlp.recipes import run_recipe
    config = binarybert_1_1_8.get_config()
    config.teacher_dir = finetuned_minilm_dir
    config.binarybert.finetune_steps = 30
    for stage in config.distill.stages:
        stage["num_steps"] = 30
    config.train.seed = 0
    config.train.progress_bar = False
    results = run_recipe(config, str(tmp_path))
    print(json.dumps(results, indent=2))
    rows = results["rows"]
    assert rows["tws_split"]["accuracy"] == pytest.approx(rows["half_width_ternary"]["accuracy"], abs=0.01)
    assert rows["tws"]["accuracy"] > rows["bwn"]["accuracy"], rows
