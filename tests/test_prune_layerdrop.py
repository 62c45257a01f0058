"""LayerDrop in BertEncoder and on-demand layer removal; structured pruning to a FLOPs target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, prune


def tiny(layers=4, seed=0, **kw):
    cfg = models.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=24, max_position_embeddings=16, num_labels=3,
                            **{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))


def inputs(n=3, t=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    mask[1, 6:] = 0
    return jnp.asarray(rng.integers(1, 40, (n, t)), jnp.int32), jnp.asarray(mask)


_MODEL = {}


def model4():
    if "m" not in _MODEL:
        _MODEL["m"] = tiny()
    return _MODEL["m"]


def test_layer_drop_zero_is_the_plain_forward_and_eval_is_deterministic():
    model, (ids, mask) = model4(), inputs()
    x = model.bert.embeddings(ids)
    ref, _ = model.bert.encoder(x, mask)
    same, _ = model.bert.encoder(x, mask, layer_drop=0.0, deterministic=False, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(same, ref)
    evald, _ = model.bert.encoder(x, mask, layer_drop=0.9)  # deterministic=True: no layer dropped
    np.testing.assert_array_equal(evald, ref)


def test_layer_drop_one_passes_the_input_through_and_is_reproducible():
    model, (ids, mask) = model4(), inputs()
    x = model.bert.embeddings(ids)
    out, inter = model.bert.encoder(x, mask, layer_drop=1.0, deterministic=False, rngs=nnx.Rngs(dropout=0),
                                    capture=("hidden_states",))
    np.testing.assert_array_equal(out, x)
    assert len(inter["hidden_states"]) == 5

    @jax.jit
    def run(key):
        return model.bert.encoder(x, mask, layer_drop=0.5, deterministic=False, rngs=nnx.Rngs(dropout=key))[0]

    a, b = run(jax.random.key(7)), run(jax.random.key(7))
    np.testing.assert_array_equal(a, b)
    outs = {np.asarray(run(jax.random.key(s))).tobytes() for s in range(12)}
    assert len(outs) > 2  # different keys drop different layers
    with pytest.raises(ValueError, match="layer_drop"):
        model.bert.encoder(x, mask, layer_drop=1.5, deterministic=False, rngs=nnx.Rngs(dropout=0))
    with pytest.raises(ValueError, match="one rate per layer"):
        model.bert.encoder(x, mask, layer_drop=(0.1, 0.2), deterministic=False, rngs=nnx.Rngs(dropout=0))


def test_with_layer_drop_trains_through_the_model_attribute():
    model, (ids, mask) = tiny(layers=2, seed=1), inputs()
    prune.with_layer_drop(model, 1.0)
    out = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=0)).last_hidden_state
    np.testing.assert_array_equal(out, model.bert.embeddings(ids))
    prune.with_layer_drop(model, 0.0)
    np.testing.assert_array_equal(model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=0)).logits,
                                  model(ids, mask).logits)


def test_removed_layer_model_equals_the_skipped_one():
    model, (ids, mask) = model4(), inputs()
    keep = prune.every_other(4)
    assert keep == [0, 2] and prune.every_other(5, 2, 1) == [1, 3]
    small, st = prune.remove_layers(model, keep)
    assert small.config.num_hidden_layers == 2 and st["layers"] == [0, 2]
    x = model.bert.embeddings(ids)
    hidden, _ = model.bert.encoder(x, mask, layer_drop=prune.skip_rates(4, keep), deterministic=False,
                                   rngs=nnx.Rngs(dropout=0))
    want = model.classifier(model.bert.pooler(hidden))
    np.testing.assert_array_equal(small(ids, mask).logits, want)
    with pytest.raises(ValueError, match="subset"):
        prune.remove_layers(model, [4])


# ----------------------------------------------------------------------------- FLOPs budget
def test_flops_against_a_hand_count():
    model = tiny(layers=2)
    t = 8
    # per head: Q,K,V,O columns/rows 2*t*h*d*4 + scores & context 2*t*t*d*2; per neuron 2*t*h*2
    head, neuron = 2 * 8 * 16 * 4 * 4 + 2 * 8 * 8 * 4 * 2, 2 * 8 * 16 * 2
    assert (head, neuron) == (5120, 512) == prune.unit_flops(model.config, t)
    dense = 2 * (4 * head + 24 * neuron) + 2 * 16 * 16  # + pooler
    assert dense == 66048 == prune.flops(model.config, t)
    scores = {"heads": [np.array([4.0, 0.5, 3.0, 2.5]), np.array([1.5, 1.2, 5.0, 6.0])],
              "neurons": [0.11 + 0.1 * np.arange(24), 3.05 + 0.1 * np.arange(24)]}
    # Target 0.5 * 66048 = 33024.  Lowest first: L0 neurons 0-3 (2048), L0 head 1 (7168), L0 neurons
    # 4-10 (10752), L1 head 1 (15872), L0 neurons 11-13 (17408), L1 head 0 (22528), L0 neurons
    # 14-23 (27648), L0 head 3 (32768 < 33024), L0 head 2 (37888 >= 33024): stop.
    st, after = prune.flops_structure(model, 0.5, seq_len=t, scores=scores, normalize=False)
    assert st == {"layers": [0, 1], "heads": [[0], [2, 3]], "neurons": [[], list(range(24))]}
    assert after == 66048 - 37888 == 28160
    assert after + head > 33024  # one unit fewer removed would miss the target
    small, _ = prune.shrink(model, structure=st)
    assert prune.flops(small.config, t) == after  # the shrunk model's own count
    # The masks of the structure simulate the removal exactly.
    ids, mask = inputs()
    masks = prune.structure_masks(model, st)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masked = nnx.merge(graphdef, prune.apply_masks(params, _tree_masks(params, masks)), rest)
    assert prune.structure_of(masked) == st
    np.testing.assert_allclose(small(ids, mask).logits, masked(ids, mask).logits, atol=1e-6)
    # Normalised magnitude scores, relative and absolute targets.
    st, after = prune.flops_structure(model, 0.6, seq_len=t)
    assert after <= 0.6 * dense and after == prune.flops(prune.shrunk_config(model.config, st), t)
    st, after = prune.flops_structure(model, 40000, seq_len=t)
    assert after <= 40000
    with pytest.raises(ValueError, match="below"):
        prune.flops_structure(model, 0.005, seq_len=t)


def _tree_masks(params, named):
    from efficient_nlp import tree
    return jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.asarray(named.get(tree.path_str(p), True)), params)
