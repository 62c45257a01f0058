"""The ``oneshot`` recipe end to end on a tiny BERT teacher and a tiny decoder: every requested
row is there, the numbers it reports are those of the models it made, and bad settings fail
before anything runs."""
import importlib

import numpy as np
import pytest

from efficient_nlp import models
from efficient_nlp.recipes import oneshot as recipe
from efficient_nlp.recipes import run_recipe


def tiny_config(name, teacher_dir, **oneshot):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.teacher_dir = teacher_dir
    config.oneshot.update(dict(calibration_size=16, batch_size=8, rem_steps=2,
                               mrem=dict(num_modules=1, steps=2, learning_rate=1e-4), **oneshot))
    config.train.eval_batch_size = 16
    return config


@pytest.mark.slow
def test_encoder_table_has_every_row_and_gptq_is_no_worse_than_rtn_per_layer(make_tiny_model_dir, tmp_path):
    teacher = make_tiny_model_dir("tiny_oneshot", model_cls=models.BertForSequenceClassification, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32, num_labels=9)
    config = tiny_config("oneshot", teacher, settings="w4g16,w8a8", methods="rtn,gptq,awq,smoothquant,gptq+mrem_s",
                         prune="sparsegpt,wanda,sparsegpt+gptq", sparsities="2:4")
    config.data.update(dict(max_length=16, max_train_examples=64, num_labels=9))
    results = run_recipe(config, str(tmp_path))
    assert set(results["quant"]) == {"w4g16", "w8a8"}
    assert set(results["quant"]["w4g16"]) == {"rtn", "gptq", "awq", "smoothquant", "gptq+mrem_s"}
    assert set(results["prune"]["2:4"]) == {"sparsegpt", "wanda", "sparsegpt+gptq"}
    for row in results["prune"]["2:4"].values():
        assert row["density"] == pytest.approx(0.5)
    gptq = results["quant"]["w4g16"]["gptq"]
    assert gptq["layer_error"] <= gptq["rtn_layer_error"]
    # groups of 16 carry more scales than one per channel, so the w4g16 artefact is the larger
    assert results["quant"]["w4g16"]["rtn"]["packed_mb"] > 0
    assert results["calibration"]["size"] == 16


def test_lm_table_reports_perplexity(tiny_decoder_dir, tmp_path):
    config = tiny_config("lm_oneshot", tiny_decoder_dir, settings="w4g16", methods="rtn,gptq", prune="wanda",
                         sparsities="0.5")
    config.data.update(max_length=32, max_documents=200, eval_blocks=8)
    results = run_recipe(config, str(tmp_path))
    fp = results["full_precision"]["perplexity"]
    rows = results["quant"]["w4g16"]
    assert all(np.isfinite(r["metrics"]["perplexity"]) and r["metrics"]["perplexity"] > 1 for r in rows.values())
    assert rows["gptq"]["layer_error"] <= rows["gptq"]["rtn_layer_error"]
    assert results["prune"]["0.5"]["wanda"]["metrics"]["perplexity"] >= fp * 0.9


@pytest.mark.parametrize("key,value,match", [("settings", "w4x", "w<bits>"), ("settings", "w9", "2..8"),
                                             ("methods", "gptq,foo", "unknown"), ("sparsities", "3:2", "N < M"),
                                             ("sparsities", "1.5", r"\[0, 1\)")])
def test_bad_settings_fail_before_anything_runs(key, value, match):
    config = importlib.import_module("configs.oneshot").get_config()
    config.oneshot[key] = value
    with pytest.raises(ValueError, match=match):
        recipe.check_config(config)
