"""The NAS recipe end to end on a tiny digits ResNet: resume gives the identical state, the
chosen architecture respects the FLOPs budget, the outputs (results, plots) are written."""
import json
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


def tiny_config(sharing="transitional", **search):
    from configs import aps_cnn
    config = aps_cnn.get_config(sharing)
    config.space.blocks_per_stage = 1
    config.space.base_widths = (4, 8, 8)
    config.space.ratios = (0.5, 1.0)
    config.search.update(dict(num_steps=6, warmup_fraction=0.5, batch_size=16, log_every=3,
                              checkpoint_every=3, controller_samples=2, marginal_samples=16,
                              controller_hidden=16, async_checkpointing=False, top_n=3))
    config.search.update(search)
    config.retrain.update(dict(num_steps=0))
    return config


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.slow  # ~60 s on an idle 2-core CPU (compiles the search step three times)
def test_interrupted_search_resumes_to_the_identical_state(tmp_path):
    from efficient_nlp.nas import Searcher, build_space
    config = tiny_config()
    space = build_space(config)
    full = Searcher(space, config.search)
    full.run(str(tmp_path / "full"))

    config.search.stop_after = 4          # crash after step 4 (checkpoint at 3 and 4)
    first = Searcher(space, config.search)
    first.run(str(tmp_path / "resumed"))
    assert int(np.asarray(first.state.step)) == 4
    config.search.stop_after = 0
    second = Searcher(space, config.search)   # a fresh process would do exactly this
    records = second.run(str(tmp_path / "resumed"))
    assert [r["step"] for r in records] == [6]
    for a, b in zip(_leaves(full.state), _leaves(second.state)):
        np.testing.assert_array_equal(a, b)
    # transitional annealing kept the P/Q columns at unit norm
    from flax import nnx
    from efficient_nlp.nas.aps import unit_columns_error
    supernet = nnx.merge(second.graphdef, second.state.params, second.state.transforms,
                         second.state.rest)
    assert unit_columns_error(supernet) < 1e-5


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_recipe_respects_the_budget_and_writes_outputs(tmp_path):
    from efficient_nlp.recipes import nas
    config = tiny_config("ordinal", budget_fraction=0.5)
    config.retrain.update(dict(num_steps=4, batch_size=16, eval_every=0, checkpoint_every=0,
                               log_every=2, async_checkpointing=False))
    results = nas.run(config, str(tmp_path))
    assert results["chosen_flops"] <= results["budget"] + 1e-6
    assert 0 <= results["test_accuracy"] <= 1
    for name in ("decisions.png", "sharing.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.load(open(tmp_path / "results.json"))["chosen"] == results["chosen"]
