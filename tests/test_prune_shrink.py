"""Pruned BERT end to end: masks through train.fit + checkpoint/resume; physical shrink."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, prune, train
from efficient_nlp.recipes.finetune import task_loss

HEADS = r"attention\.(query|key|value)\.(kernel|bias)$|attention\.output\.kernel$"
FFN = r"ffn\.(intermediate\.(kernel|bias)|output\.kernel)$"


_CACHE = {}


def tiny(**kw):
    """A fresh copy of one tiny classifier (random init is slow-ish on CPU: done once)."""
    if "model" not in _CACHE:
        _CACHE["model"] = _build(**kw)
    graphdef, state = nnx.split(_CACHE["model"])
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def _build(**kw):
    cfg = models.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=24, max_position_embeddings=16, num_labels=3, **kw)
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))


def batch(n=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": rng.integers(1, 40, (n, t)).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((n, t), np.int32), "labels": rng.integers(0, 3, n).astype(np.int32)}


def masked_model(model, rules):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks = prune.make_masks(params, rules)
    return nnx.merge(graphdef, prune.apply_masks(params, masks), rest)


def test_shrunk_model_equals_masked_model_and_reloads(tmp_path):
    model = masked_model(tiny(), [prune.rule(HEADS, "heads", 0.5, "global", head_dim=4),
                                  prune.rule(FFN, "ffn_neurons", 0.5, "uniform")])
    small, st = prune.shrink(model)
    assert [len(h) for h in st["heads"]] != [4, 4] and sum(len(h) for h in st["heads"]) == 4  # global
    assert [len(n) for n in st["neurons"]] == [12, 12]
    assert small.config.layer_num_attention_heads == tuple(len(h) for h in st["heads"])
    b = batch()
    want = model(b["input_ids"], b["attention_mask"]).logits
    np.testing.assert_allclose(small(b["input_ids"], b["attention_mask"]).logits, want, atol=1e-6)
    models.save_hf_checkpoint(small, tmp_path)
    again = models.from_pretrained(str(tmp_path), num_labels=3)
    np.testing.assert_allclose(again(b["input_ids"], b["attention_mask"]).logits, want, atol=1e-6)
    assert prune.count_params(small) < prune.count_params(model)
    ratio = prune.flops(small.config, 8) / prune.flops(model.config, 8)
    assert 0.4 < ratio < 0.6
    rep = prune.shrink_report(model, small, seq_len=8, batch_size=2, measure=False)
    assert "parameters" in rep.format()


def test_layer_pruning_drops_layers():
    model = masked_model(tiny(), [prune.rule(r"layers\.\d+\..*kernel$", "layers", 0.5)])
    small, st = prune.shrink(model)
    assert len(st["layers"]) == 1 and small.config.num_hidden_layers == 1
    b = batch()
    assert small(b["input_ids"], b["attention_mask"]).logits.shape == (4, 3)


@pytest.mark.slow  # two compilations of the train step: ~50 s on 2 shared CPU cores
def test_masks_survive_training_and_checkpoint_resume(tmp_path):
    rules = [prune.rule(r"layers\.\d+\.(attention|ffn)\..*kernel$", "unstructured", 0.7)]
    config = train.default_train_config()
    config.update(dict(num_steps=4, batch_size=4, learning_rate=1e-2, checkpoint_every=2, log_every=2,
                       async_checkpointing=False, tensorboard=False, progress_bar=False, warmup_ratio=0.0))

    def run(steps):
        config.num_steps = steps
        tx = prune.pruning(train.make_optimizer(config, 6), rules, criterion="movement",
                           schedule=prune.gradual_cubic(0, 4, 2))
        return train.fit(tiny(), task_loss, lambda s: iter([batch(seed=k) for k in range(s, 6)]),
                         config=config, workdir=str(tmp_path), optimizer=tx)[0]

    def zeros(model):
        return {k: np.asarray(v.get_value()) == 0 for k, v in models.named_params(model).items()
                if "layers" in k and k.endswith("kernel")}

    first = zeros(run(4))
    total = sum(z.size for z in first.values())
    assert sum(z.sum() for z in first.values()) == round(0.7 * total)
    resumed = zeros(run(6))  # resumes from the step-4 checkpoint, masks from the optimizer state
    for k in first:  # the schedule ended at step 4: the same weights stay exactly zero
        np.testing.assert_array_equal(resumed[k], first[k])


def test_structured_config_loads():
    import sys, os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import prune_magnitude, prune_movement, prune_structured
    from efficient_nlp.recipes.prune import build_rules, build_schedule
    model = tiny()
    for cfg in (prune_magnitude.get_config("0.5"), prune_movement.get_config(), prune_structured.get_config()):
        rules = build_rules(cfg.prune.rules, model)
        _, params = nnx.split(model, nnx.Param)
        prune.make_plan(params, rules)
        build_schedule(cfg.prune.schedule)
    assert prune_magnitude.get_config("0.7").prune.rules[0]["sparsity"] == 0.7
