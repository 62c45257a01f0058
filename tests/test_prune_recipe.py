"""The pruning recipe end to end on a tiny model: structured pruning + physical shrink."""
import json

import numpy as np
import pytest

from efficient_nlp import models


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_prune", hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64)


def test_structured_prune_recipe_shrinks_to_an_equivalent_model(tiny_dir, tmp_path):
    from configs import prune_structured
    from efficient_nlp.recipes import run_recipe

    config = prune_structured.get_config("0.5")
    config.model_dir = tiny_dir
    config.data.max_train_examples = 64
    config.data.max_length = 16
    config.train.update(dict(num_steps=8, batch_size=8, eval_every=0, checkpoint_every=0,
                             log_every=4, async_checkpointing=False, tensorboard=False))
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=0, end_step=4, frequency=2)
    config.prune.measure_latency = False
    results = run_recipe(config, str(tmp_path))

    shrunk = models.from_pretrained(str(tmp_path / "model_shrunk"), num_labels=9)
    cfg = shrunk.config
    assert [cfg.layer_num_heads(i) for i in range(2)] == [1, 1]  # half of 2 heads
    assert [cfg.layer_intermediate_size(i) for i in range(2)] == [16, 16]  # half of 32
    shrink = results["shrink"]
    assert shrink["params_after"] < shrink["params_before"]
    assert shrink["flops_after"] < shrink["flops_before"]
    # The physically smaller model predicts exactly what the masked one does.
    assert shrink["dev_shrunk"] == pytest.approx(results["dev_after"])
    assert json.load(open(tmp_path / "results.json"))["shrink"]["params_after"] == shrink["params_after"]
    png = (tmp_path / "sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    masked = models.from_pretrained(str(tmp_path / "model"), num_labels=9)
    kernel = np.asarray(masked.bert.encoder.layers[0].ffn.intermediate.kernel.get_value())
    assert np.sum(np.all(kernel == 0, axis=0)) == 16  # half the neurons zeroed in the saved masked model


def _tiny_config(config, tiny_dir, steps=6):
    config.model_dir = tiny_dir
    config.data.max_train_examples = 64
    config.data.max_length = 16
    config.train.update(dict(num_steps=steps, batch_size=8, eval_every=0, checkpoint_every=0,
                             log_every=3, async_checkpointing=False, tensorboard=False))
    config.prune.measure_latency = False
    return config


def test_new_method_configs_build():
    from configs import prune_earlybert, prune_layerdrop, prune_lottery, prune_structured_flops
    assert prune_lottery.get_config("0.8").prune.method == "lottery"
    assert prune_earlybert.get_config("0.25,0.5").prune.earlybert.ffn_sparsity == 0.5
    assert prune_structured_flops.get_config("0.4").prune.flops.target == 0.4
    assert prune_layerdrop.get_config("0.3").prune.layerdrop.rate == 0.3


@pytest.mark.slow  # one compiled train step per round: ~2 min on 2 shared CPU cores
def test_lottery_recipe(tiny_dir, tmp_path):
    from configs import prune_lottery
    from efficient_nlp.recipes import run_recipe

    config = _tiny_config(prune_lottery.get_config("0.75"), tiny_dir)
    config.prune.lottery.update(dict(rounds=2, rewind_step=2))
    results = run_recipe(config, str(tmp_path))
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["sparsity_total"] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_flops_recipe_meets_the_target(tiny_dir, tmp_path):
    from configs import prune_structured_flops
    from efficient_nlp.recipes import run_recipe

    config = _tiny_config(prune_structured_flops.get_config("0.5"), tiny_dir)
    config.prune.flops.score_batches = 2
    results = run_recipe(config, str(tmp_path))
    shrink = results["shrink"]
    assert shrink["flops_after"] <= 0.5 * shrink["flops_before"]
    assert shrink["dev_shrunk"] == pytest.approx(results["dev_after"])


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_earlybert_and_layerdrop_recipes(tiny_dir, tmp_path):
    from configs import prune_earlybert, prune_layerdrop
    from efficient_nlp.recipes import run_recipe

    config = _tiny_config(prune_earlybert.get_config("0.5,0.5"), tiny_dir)
    config.prune.earlybert.update(dict(check_every=2, max_search_steps=6, threshold=0.5, window=1))
    results = run_recipe(config, str(tmp_path / "eb"))
    assert results["shrink"]["params_after"] < results["shrink"]["params_before"]
    small = models.from_pretrained(str(tmp_path / "eb" / "model_shrunk"), num_labels=9)
    assert [small.config.layer_num_heads(i) for i in range(2)] == [1, 1]
    config = _tiny_config(prune_layerdrop.get_config("0.5"), tiny_dir)
    results = run_recipe(config, str(tmp_path / "ld"))
    assert results["shrink"]["structure"]["layers"] == [0]
    assert "accuracy" in results["shrink"]["dev_shrunk"]


def test_movement_recipe_takes_the_criterions_arguments(tiny_dir, tmp_path):
    from configs import prune_movement
    from efficient_nlp.recipes import run_recipe

    config = _tiny_config(prune_movement.get_config("0.9"), tiny_dir)
    config.prune.schedule = dict(kind="gradual_cubic", begin_step=0, end_step=4, frequency=2)
    config.prune.criterion_kwargs = dict(learning_rate=1e-2)   # Sanh et al.'s learned scores
    results = run_recipe(config, str(tmp_path / "ok"))
    assert results["sparsity_total"] == pytest.approx(0.9, abs=1e-3)
    config.prune.criterion_kwargs = dict(score_lr=1e-2)
    with pytest.raises(ValueError, match=r"pruning criterion 'movement': bad arguments \['score_lr'\]"):
        run_recipe(config, str(tmp_path / "bad"))
