"""The compression recipes on a decoder (``data.task = "lm"``): the configs/lm_*.py files run
end to end on a tiny Llama-style decoder with grouped-query attention, and what they report is
what the saved models give."""
import importlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from efficient_nlp import data, models
from efficient_nlp.models import family as F
from efficient_nlp.recipes import run_recipe


def tiny(name, model_dir):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model_dir = model_dir
    if "teacher_dir" in config:
        config.teacher_dir = model_dir
    config.data.update(max_length=32, max_documents=200, eval_blocks=8)
    config.train.update(batch_size=8, eval_batch_size=8, progress_bar=False)   # fit splits a batch over up to 8 devices
    return config


def test_lm_metrics_are_perplexity_of_the_next_token_nll():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(3, 5, 7)), rng.integers(0, 7, (3, 5))
    m = data.lm_metrics(logits, ids, weights=np.array([1, 0, 1]))
    keep = logits[[0, 2], :-1]
    log_p = keep - np.log(np.exp(keep).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, ids[[0, 2], 1:, None], -1).mean()
    assert m["nll"] == pytest.approx(nll) and m["perplexity"] == pytest.approx(np.exp(nll))


def test_structured_pruning_of_a_decoder_removes_whole_kv_groups(tiny_decoder_dir, tmp_path):
    config = tiny("lm_prune_structured", tiny_decoder_dir)
    config.train.update(num_steps=4, eval_every=4, checkpoint_every=4)
    config.prune.schedule = dict(kind="one_shot", step=1)
    results = run_recipe(config, str(tmp_path))
    st = results["shrink"]["structure"]
    assert all(sorted(h) in ([0, 1], [2, 3]) for h in st["heads"])   # 2 query heads per KV head
    small = models.from_pretrained(tmp_path / "model_shrunk")
    assert small.config.layer_num_key_value_heads == (1, 1) and F.head_layout(small, 0).num_heads == 2
    task = data.load_lm_task(tiny_decoder_dir, block_size=32, max_documents=200, eval_blocks=8)
    logits = np.asarray(small(jnp.asarray(task.dev["input_ids"])).logits)
    got = data.lm_metrics(logits, task.dev["labels"])["perplexity"]
    assert got == pytest.approx(results["shrink"]["dev_shrunk"]["perplexity"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_qat_ptq_and_distill_run_on_a_decoder(tiny_decoder_dir, tmp_path):
    config = tiny("lm_qat_4_4_8", tiny_decoder_dir)
    for s in config.distill.stages:
        s["num_steps"] = 4
    config.distill.stages[0]["matches"] = [m for m in config.distill.stages[0]["matches"]
                                           if m.get("student_layer", 0) < 2]
    qat = run_recipe(config, str(tmp_path / "qat"))
    assert qat["cost"]["quantized"]["size_mb"] < qat["cost"]["full_precision"]["size_mb"] / 4
    assert os.path.isfile(tmp_path / "qat" / "quantized" / "manifest.json") or os.listdir(tmp_path / "qat" / "quantized")

    config = tiny("lm_ptq_4_4_8", tiny_decoder_dir)
    config.ptq.update(method="mrem_s", calibration_size=16)
    config.ptq.mrem.update(steps=4, num_modules=2)
    ptq = run_recipe(config, str(tmp_path / "ptq"))
    assert set(ptq["after"]) == {"mrem_s"} and np.isfinite(ptq["after"]["mrem_s"]["perplexity"])

    config = tiny("lm_distill", tiny_decoder_dir)
    config.student.layers = (0,)
    config.distill.stages[0]["matches"] = [dict(feature="hidden", loss="hidden_mse", student_layer=1, teacher_layer=1)]
    for s in config.distill.stages:
        s["num_steps"] = 4
    res = run_recipe(config, str(tmp_path / "distill"))
    student = models.from_pretrained(tmp_path / "distill" / "student")
    assert F.num_layers(student) == 1 and res["size"]["student_params"] < res["size"]["teacher_params"]
    with open(tmp_path / "distill" / "results.json") as f:
        assert json.load(f)["student"]["perplexity"] == pytest.approx(res["student"]["perplexity"])
