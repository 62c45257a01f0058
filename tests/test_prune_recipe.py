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
