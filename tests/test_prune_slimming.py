"""EarlyBERT-style slimming: gates on heads / FFN neurons applied to the parameters."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models, prune, train
from efficient_nlp.recipes.finetune import task_loss

D = 4  # head_dim


def tiny(layers=2, seed=0):
    cfg = models.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=24, max_position_embeddings=16, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(seed))


def batch(n=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": rng.integers(1, 40, (n, t)).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((n, t), np.int32), "labels": rng.integers(0, 3, n).astype(np.int32)}


def random_gates(model, seed=1):
    g = prune.init_gates(model)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(-1, 2, x.shape), jnp.float32), g)


def gated_model(model, gates):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, prune.apply_gates(params, gates, D), rest)


def test_gated_forward_equals_explicit_per_head_and_neuron_scaling():
    model, b = tiny(), batch()
    gates = random_gates(model)
    want = ("hidden_states", "context", "mha_out", "ffn_intermediate", "ffn_out")
    out = gated_model(model, gates)(b["input_ids"], b["attention_mask"], capture=want).intermediates
    plain = model(b["input_ids"], b["attention_mask"], capture=want).intermediates
    layer = model.bert.encoder.layers[0]
    # Layer 0 from the SAME input: scale each head's context by its gate, then the output dense.
    ctx = plain["context"][0] * np.repeat(np.asarray(gates["heads"]["0"]), D)
    x = plain["hidden_states"][0]
    mha = layer.attention.layer_norm(layer.attention.output(ctx) + x)
    np.testing.assert_allclose(out["mha_out"][0], mha, atol=1e-5)
    # FFN of layer 0 from the gated mha output: scale each neuron's activation by its gate.
    inner = jax.nn.gelu(layer.ffn.intermediate(mha), approximate=False) * np.asarray(gates["ffn"]["0"])
    np.testing.assert_allclose(out["ffn_intermediate"][0] * np.asarray(gates["ffn"]["0"]), inner, atol=1e-5)
    np.testing.assert_allclose(out["ffn_out"][0], layer.ffn.layer_norm(layer.ffn.output(inner) + mha), atol=1e-5)


def test_unit_gates_are_the_identity_and_zero_gates_remove_units():
    model, b = tiny(), batch()
    ones = prune.init_gates(model)
    np.testing.assert_array_equal(gated_model(model, ones)(b["input_ids"], b["attention_mask"]).logits,
                                  model(b["input_ids"], b["attention_mask"]).logits)
    slim = prune.Slimming(model)
    np.testing.assert_array_equal(slim(b["input_ids"], b["attention_mask"]).logits,
                                  model(b["input_ids"], b["attention_mask"]).logits)
    # Gates at 0 on some heads / neurons == those units physically removed by shrink.
    g = jax.tree.map(np.array, ones)
    g["heads"]["0"][[1, 3]] = 0
    g["ffn"]["1"][:10] = 0
    masks = jax.tree.map(lambda x: x != 0, g)
    st = prune.gate_structure(model, masks)
    assert st["heads"][0] == [0, 2] and st["neurons"][1] == list(range(10, 24))
    small, _ = prune.shrink(model, structure=st)
    np.testing.assert_allclose(small(b["input_ids"], b["attention_mask"]).logits,
                               gated_model(model, g)(b["input_ids"], b["attention_mask"]).logits, atol=1e-6)


def test_l1_gradient():
    model = tiny()
    gates = random_gates(model)
    grad = jax.grad(lambda g: prune.l1_penalty(g, 0.3, 0.05))(gates)
    for part, lam in (("heads", 0.3), ("ffn", 0.05)):
        for i, g in gates[part].items():
            np.testing.assert_allclose(grad[part][i], lam * np.sign(g), rtol=1e-6)
    # Through the wrapper's loss: d/dg (task + L1) = d/dg task + lam * sign(g).
    slim = prune.Slimming(model)
    b = batch()
    graphdef, params = nnx.split(slim, nnx.Param)[:2]

    def total(p, lam):
        m = nnx.merge(graphdef, p)
        return prune.slimming_loss(task_loss, lam, lam)(m, b, nnx.Rngs(dropout=0))[0]

    grad = jax.jit(jax.grad(total))  # one compilation, lam traced
    g1, g0 = grad(params, 0.01), grad(params, 0.0)
    diff = np.asarray(g1["head_gates"][0][...]) - np.asarray(g0["head_gates"][0][...])
    np.testing.assert_allclose(diff, 0.01 * np.ones(4), rtol=1e-4)


def test_gate_masks_distance_and_stabilisation():
    gates = {"heads": {"0": jnp.array([0.1, 0.9, 0.5, 0.2]), "1": jnp.array([1.0, 0.05, 0.3, 0.7])},
             "ffn": {"0": jnp.arange(10.0), "1": -jnp.arange(10.0)}}
    m = prune.gate_masks(gates, 0.5, 0.3, "uniform")
    np.testing.assert_array_equal(m["heads"]["0"], [False, True, True, False])
    np.testing.assert_array_equal(m["heads"]["1"], [True, False, False, True])
    np.testing.assert_array_equal(m["ffn"]["1"], [False] * 3 + [True] * 7)  # |g| is the score
    mg = prune.gate_masks(gates, 0.5, 0.0, "global")  # smallest 4 of 8 head gates overall
    assert int(sum((~np.asarray(v)).sum() for v in mg["heads"].values())) == 4
    np.testing.assert_array_equal(mg["heads"]["0"], [False, True, True, False])
    np.testing.assert_array_equal(mg["heads"]["1"], [True, False, False, True])
    a = {"x": np.array([True, True, False, False])}
    assert prune.mask_distance(a, {"x": np.array([True, False, False, True])}) == 0.5
    assert not prune.stabilized([0.5, 0.01, 0.02], 0.05, 3)
    assert prune.stabilized([0.5, 0.01, 0.02, 0.0], 0.05, 3)
    assert not prune.stabilized([0.0], 0.05, 3)


def test_earlybert_search_stops_when_the_mask_stabilises():
    cfg = train.default_train_config()
    cfg.update(dict(num_steps=40, batch_size=8, learning_rate=5e-2, warmup_ratio=0.0,   # 8: up to 8 devices
                    tensorboard=False, progress_bar=False))
    model = tiny()
    res = prune.earlybert_search(model, task_loss, lambda s: iter([batch(8, seed=k) for k in range(s, s + 100)]),
                                 config=cfg, head_sparsity=0.5, ffn_sparsity=0.25, l1_heads=1e-2,
                                 l1_ffn=1e-2, check_every=2, threshold=0.2, window=2)
    assert res.stable and res.steps < 40 and len(res.distances) >= 2
    assert max(res.distances[-2:]) < 0.2
    assert [len(h) for h in res.structure["heads"]] == [2, 2]
    assert [len(n) for n in res.structure["neurons"]] == [18, 18]
    small, _ = prune.shrink(model, structure=res.structure)
    assert small.config.layer_num_attention_heads == (2, 2)
    assert small(batch()["input_ids"]).logits.shape == (4, 3)
