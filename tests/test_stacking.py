"""Progressive stacking (Gong et al. 2019): the grown model, the carried optimizer state, and
the loss-against-compute plot.

Properties: every parameter of layer ``j`` of the grown model equals layer ``j mod L`` of the
source and everything else equals the source, for BERT, ELECTRA (embedding projection),
Llama-style and GPT-2 decoders; the grown model has the structure of one built at the new depth;
its forward pass equals running the source's layer stack twice; an optax state carried over has
the structure of ``optimizer.init(grown params)`` with each moment copied from its source layer,
and the next Adam update of the grown model is the source's update, copied; the grown model
round-trips through a HF checkpoint (also read by ``transformers``).
"""
import functools
import json
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import models
from efficient_nlp.models import family as F
from efficient_nlp.models.hf_checkpoint import named_params
from efficient_nlp.pretrain.plots import LossCurve, plot_loss_vs_compute
from efficient_nlp.pretrain.stacking import (layer_stack_paths, stack_layers, stack_opt_state, stack_tree,
                                             stacked_config)
from efficient_nlp.train.optim import make_optimizer

from _tiny import lm_batch, logits, tiny_bert, tiny_decoder, token_batch

LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")


def _electra_mlm():
    """An ELECTRA-family masked LM whose embeddings (8 wide) are projected to hidden 16."""
    cfg = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, model_type="electra", embedding_size=8)
    model = models.BertForMaskedLM(cfg, rngs=nnx.Rngs(3))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params))
    return model


_BUILD = {"bert": tiny_bert, "electra_mlm": _electra_mlm, "llama": lambda: tiny_decoder("llama"),
          "gpt2": lambda: tiny_decoder("gpt2")}


@functools.cache
def _source(kind):
    """The tiny source model of ``kind``, built once (tests never change it)."""
    return _BUILD[kind]()


MODELS = {kind: functools.partial(_source, kind) for kind in _BUILD}


def _source_name(name, n):
    """The source parameter of grown parameter ``name``: layer j -> layer j mod n."""
    m = LAYER.match(name)
    return name if m is None else f"{m.group(1)}.{int(m.group(2)) % n}.{m.group(3)}"


def _values(model):
    return {k: np.asarray(v.get_value()) for k, v in named_params(model).items()}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_grown_model_copies_every_layer(kind):
    model = MODELS[kind]()
    before = _values(model)
    grown = stack_layers(model)
    n = F.num_layers(model)
    assert n == 2 and F.num_layers(grown) == 4 and grown.config.num_hidden_layers == 4
    assert grown.config == model.config.replace(num_hidden_layers=4)
    got = _values(grown)
    layer_names = {k for k in got if LAYER.match(k)}
    assert {int(LAYER.match(k).group(2)) for k in layer_names} == {0, 1, 2, 3}
    assert {_source_name(k, n) for k in got} == set(before)  # nothing new but the copied layers
    assert len(got) == len(before) + len([k for k in before if LAYER.match(k)])
    for k, v in got.items():
        np.testing.assert_array_equal(v, before[_source_name(k, n)], err_msg=k)
    # the structure (modules, shapes, static attributes) of a model built at the new depth
    fresh = nnx.eval_shape(lambda: type(model)(grown.config, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(fresh) == nnx.graphdef(grown)
    assert jax.tree.map(lambda x: tuple(x.shape), nnx.state(fresh)) == jax.tree.map(
        lambda x: tuple(x.shape), nnx.state(grown))
    # no buffer is shared (with the source or within the grown model): either may be donated
    pointers = [v.get_value().unsafe_buffer_pointer() for v in named_params(grown).values()]
    source_pointers = {v.get_value().unsafe_buffer_pointer() for v in named_params(model).values()}
    assert len(set(pointers)) == len(pointers) and not source_pointers & set(pointers)
    # the source is untouched and the copies are independent of it and of each other
    assert F.num_layers(model) == 2
    path = F.site_path(grown, 2, "q") + ".kernel"
    F.get_module(grown, F.site_path(grown, 2, "q")).kernel.set_value(jnp.zeros_like(got[path]))
    np.testing.assert_array_equal(_values(model)[_source_name(path, n)], before[_source_name(path, n)])
    np.testing.assert_array_equal(_values(grown)[_source_name(path, n)], before[_source_name(path, n)])


@functools.partial(nnx.jit, static_argnames="times")
def _repeated(model, batch, times=2):
    """The source's layer stack run ``times`` times between its embedding and its head."""
    h = F.embed(model, batch)
    for _ in range(times):
        h, _ = F.run_layers(model, h, batch["attention_mask"])
    return F.head(model, h)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_grown_forward_runs_the_source_stack_twice(kind):
    model = MODELS[kind]()
    batch = token_batch(2, 9, 50) if kind == "bert" else lm_batch(2, 9, 61)
    grown = stack_layers(model)
    want = np.asarray(_repeated(model, batch))
    np.testing.assert_allclose(np.asarray(logits(grown, batch)), want, rtol=1e-5, atol=1e-5)
    # and it is not the source's own output (the property could fail)
    assert np.max(np.abs(np.asarray(logits(model, batch)) - want)) > 1e-3


def test_pruned_model_keeps_its_per_layer_sizes():
    """A model with per-layer head counts / FFN widths: the sizes repeat with their layers."""
    model = F.resized(_source("bert"), heads=[[1], [0, 1]], neurons=[list(range(10)), list(range(24))])
    grown = stack_layers(model, times=3)
    assert grown.config.layer_num_attention_heads == (1, 2) * 3
    assert grown.config.layer_intermediate_sizes == (10, 24) * 3
    assert [F.head_layout(grown, i).num_heads for i in range(6)] == [1, 2] * 3
    assert [F.num_neurons(grown, i) for i in range(6)] == [10, 24] * 3
    fresh = nnx.eval_shape(lambda: type(model)(grown.config, rngs=nnx.Rngs(0)))
    assert nnx.graphdef(fresh) == nnx.graphdef(grown)


def test_three_times_runs_the_stack_three_times():
    model = F.resized(_source("bert"), layers=[1], heads=[[0]])  # one layer with one head
    grown = stack_layers(model, times=3)
    assert F.num_layers(grown) == 3
    batch = token_batch(2, 8, 50)
    np.testing.assert_allclose(np.asarray(logits(grown, batch)), np.asarray(_repeated(model, batch, times=3)),
                               rtol=1e-5, atol=1e-5)


class _Pair(nnx.Module):
    """Two masked LMs sharing one embedding module (as an ELECTRA generator and discriminator)."""

    def __init__(self):
        self.generator = nnx.clone(_source("electra_mlm"))
        self.discriminator = nnx.clone(_source("electra_mlm"))
        self.discriminator.electra.embeddings = self.generator.electra.embeddings


def test_container_grows_each_model_and_keeps_sharing():
    pair = _Pair()
    assert set(layer_stack_paths(pair)) == {"generator.electra.encoder.layers", "discriminator.electra.encoder.layers"}
    grown = stack_layers(pair)
    assert F.num_layers(grown.generator) == F.num_layers(grown.discriminator) == 4
    assert grown.discriminator.electra.embeddings is grown.generator.electra.embeddings
    assert grown.generator.electra.embeddings is not pair.generator.electra.embeddings
    params = nnx.state(pair, nnx.Param)
    grown_params = stack_tree(params, 2, paths=layer_stack_paths(pair))
    assert jax.tree.structure(grown_params) == jax.tree.structure(nnx.state(grown, nnx.Param))
    for a, b in zip(jax.tree.leaves(grown_params), jax.tree.leaves(nnx.state(grown, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def _trained_state(optimizer, params, steps=2, seed=0):
    """The optimizer state after ``steps`` updates with random gradients (moments differ per layer)."""
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for s in range(steps):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + s), len(leaves))
        grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        _, state = update(grads, state, params)
    return state


def _by_path(tree):
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


OPTIMIZERS = {
    "make_optimizer": lambda: make_optimizer({"learning_rate": 1e-3, "warmup_ratio": 0.1, "weight_decay": 0.01,
                                              "grad_clip": 1.0}, 100),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
}


@pytest.mark.parametrize("kind, opt_name", [("bert", "make_optimizer"), ("llama", "adamw")])
def test_opt_state_is_carried_layer_by_layer(kind, opt_name):
    model = MODELS[kind]()
    optimizer = OPTIMIZERS[opt_name]()
    params = nnx.state(model, nnx.Param)
    state = _trained_state(optimizer, params)
    grown_params = nnx.state(stack_layers(model), nnx.Param)
    carried = stack_opt_state(state, 2)
    assert jax.tree.structure(carried) == jax.tree.structure(optimizer.init(grown_params))
    source, got = _by_path(state), _by_path(carried)
    assert len(got) > len(source)
    for path, value in got.items():
        np.testing.assert_array_equal(value, source[_source_name(path, 2)], err_msg=path)
    counts = [v for p, v in got.items() if p.endswith("count")]
    assert counts and all(int(c) == 2 for c in counts)
    # the paths of layer_stack_paths select the same lists
    narrowed = stack_opt_state(state, 2, paths=layer_stack_paths(model))
    for a, b in zip(jax.tree.leaves(narrowed), jax.tree.leaves(carried)):
        np.testing.assert_array_equal(a, b)


def test_next_adam_update_of_grown_model_is_the_copied_update():
    """Adam is elementwise: with carried moments and gradients copied like the layers, the grown
    model's update is the source's update with each layer's part copied."""
    model = _source("bert")
    optimizer = optax.adamw(1e-2, weight_decay=0.01)
    params = nnx.state(model, nnx.Param)
    state = _trained_state(optimizer, params, steps=3)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    update = jax.jit(optimizer.update)
    small_updates, _ = update(grads, state, params)
    grown_updates, _ = update(stack_tree(grads, 2), stack_opt_state(state, 2),
                                        nnx.state(stack_layers(model), nnx.Param))
    want = _by_path(stack_tree(small_updates, 2))
    got = _by_path(grown_updates)
    assert set(got) == set(want)
    for path in got:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-9, err_msg=path)


def test_trees_that_are_not_the_models_give_clear_errors():
    params = nnx.state(_source("bert"), nnx.Param)
    with pytest.raises(ValueError, match=r"no list of 3 layers.*lists of \[2\] entries"):
        stack_tree(params, 3)
    with pytest.raises(ValueError, match="found no subtree at"):
        stack_tree(params, 2, paths=["roberta.encoder.layers"])
    with pytest.raises(ValueError, match="not a list of 2 layers"):
        stack_tree(params, 2, paths=["bert.encoder"])
    with pytest.raises(ValueError, match="times must be an int >= 1"):
        stack_tree(params, 2, times=0)
    adam = optax.adam(1e-3).init(params)
    with pytest.raises(ValueError, match="no list of 4 layers"):
        stack_opt_state(adam, 4)
    sgd = optax.sgd(1e-3).init(params)  # no parameter-shaped part: nothing to carry
    assert stack_opt_state(sgd, 2) is not None
    assert jax.tree.structure(stack_opt_state(sgd, 2)) == jax.tree.structure(sgd)
    with pytest.raises(F.FamilyError, match="not a model of a registered family"):
        stack_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_stacked_config_repeats_per_layer_sizes():
    cfg = models.DecoderConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=24,
                               layer_num_attention_heads=(4, 2), layer_num_key_value_heads=(2, 1),
                               layer_intermediate_sizes=(24, 8))
    out = stacked_config(cfg)
    assert (out.num_hidden_layers, out.layer_num_attention_heads, out.layer_num_key_value_heads,
            out.layer_intermediate_sizes) == (4, (4, 2, 4, 2), (2, 1, 2, 1), (24, 8, 24, 8))
    assert stacked_config(models.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=3,
                                            num_attention_heads=2, intermediate_size=8)).layer_intermediate_sizes is None


@pytest.mark.parametrize("kind", ["electra_mlm", "llama"])
def test_grown_model_round_trips_through_a_checkpoint(kind, tmp_path):
    grown = stack_layers(MODELS[kind]())
    models.save_hf_checkpoint(grown, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    per_layer = {"layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes"}
    assert not per_layer & set(config)  # no per-layer sizes: a plain config transformers can build
    loaded = models.from_pretrained(tmp_path, head="mlm" if kind == "electra_mlm" else None)
    assert type(loaded) is type(grown) and F.num_layers(loaded) == 4
    want, got = _values(grown), _values(loaded)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow  # importing torch takes ~10 s on 2 cores
def test_transformers_reads_the_grown_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    grown = stack_layers(_source("electra_mlm"))
    models.save_hf_checkpoint(grown, tmp_path)
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.num_hidden_layers == 4
    batch = token_batch(2, 9, 50)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                           attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                           token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long)).logits.numpy()
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(theirs[mask], np.asarray(logits(grown, batch))[mask], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the plot
def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_plot_writes_a_two_panel_png(tmp_path):
    stacked = LossCurve.from_points([(0, 0, 7.0), (1e9, 2.0, 5.0), (3e9, 5.0, 4.0), (7e9, 9.0, 3.5)],
                                    events=[(1e9, 2.0, "2 -> 4 layers")])
    runs = {"4 layers": [(0, 0.0, 7.0), (2e9, 3.0, 5.5), (4e9, 6.0, 4.5), (8e9, 12.0, 3.7)], "stacked": stacked}
    out = plot_loss_vs_compute(runs, tmp_path / "loss.png", title="MLM loss")
    assert out == tmp_path / "loss.png"
    (width, height), size = _png_size(out)
    assert (width, height) == (1000, 360) and size > 10_000
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []  # the figure was closed


def test_plot_rejects_bad_input(tmp_path):
    path = tmp_path / "x.png"
    with pytest.raises(ValueError, match="non-empty mapping"):
        plot_loss_vs_compute({}, path)
    with pytest.raises(ValueError, match="has no points"):
        plot_loss_vs_compute({"a": []}, path)
    with pytest.raises(ValueError, match=r"one value per point; got 2, 2 and 3"):
        plot_loss_vs_compute({"a": LossCurve((1.0, 2.0), (1.0, 2.0), (3.0, 2.0, 1.0))}, path)
    with pytest.raises(ValueError, match=r"point 1 has 2 values"):
        plot_loss_vs_compute({"a": [(1, 1, 3.0), (2, 2)]}, path)
    with pytest.raises(ValueError, match=r"loss\[0\] = nan must be finite"):
        plot_loss_vs_compute({"a": [(1, 1, float("nan"))]}, path)
    with pytest.raises(ValueError, match=r"flops\[0\] = -1 must be a finite number >= 0"):
        plot_loss_vs_compute({"a": [(-1, 1, 2.0)]}, path)
    assert not path.exists()
