"""Cross-layer parameter sharing (ALBERT; Takase & Kiyono 2021): assignments against hand-written
lists, averaging init, forward parity with an unshared reference, training with tied layers, the
gradient of a shared parameter, HF save / load round trips and the errors."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from _tiny import lm_batch, logits, tiny_bert, tiny_decoder, token_batch
from efficient_nlp import models, sharing, train
from efficient_nlp.models import family as F
from efficient_nlp.models.hf_checkpoint import read_safetensors

N, M, MODE = 4, 2, "cycle_rev"  # groups: positions [0, 3] -> layer 0, [1, 2] -> layer 1


def build(kind):
    """A tiny 4-layer model of ``kind`` and a batch for it."""
    if kind == "bert":
        return tiny_bert(layers=N), token_batch(2, 8, 50)
    return tiny_decoder("llama", layers=N), lm_batch(2, 8, 61)


def flat(state) -> dict:
    """A state as {dotted path: NumPy array}."""
    return {".".join(map(str, k)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for k, v in nnx.to_flat_state(state)}


def layer_params(model, p) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in models.named_params(F.layer_stack(model)[p]).items()}


def sq_loss(model, batch, rngs=None):
    return jnp.mean(F.forward(model, batch).logits ** 2), {}


# ----------------------------------------------------------------------------- assignments
@pytest.mark.parametrize("mode, want", [
    ("sequence", (0, 0, 1, 1, 2, 2)),
    ("cycle", (0, 1, 2, 0, 1, 2)),
    ("cycle_rev", (0, 1, 2, 2, 1, 0)),
])
def test_assignment_six_positions_three_layers(mode, want):
    assert sharing.assignment(6, 3, mode) == want


def test_assignment_all_and_uneven_cycle_rev():
    assert sharing.assignment(6, 1, "all") == (0,) * 6
    # Takase & Kiyono: cycle up to max(M, M * (ceil(N / M) - 1)) positions, then the rest in reverse order
    assert sharing.assignment(7, 3, "cycle_rev") == (0, 1, 2, 0, 1, 2, 2)
    assert sharing.assignment(5, 3, "cycle_rev") == (0, 1, 2, 2, 1)
    assert sharing.assignment(8, 3, "cycle") == (0, 1, 2, 0, 1, 2, 0, 1)
    assert sharing.assignment(4, 4, "sequence") == sharing.assignment(4, 4, "cycle_rev") == (0, 1, 2, 3)


def test_assignment_errors():
    with pytest.raises(ValueError, match=r"num_unique must be in \[1, 6\].*got 7"):
        sharing.assignment(6, 7, "cycle")
    with pytest.raises(ValueError, match=r"num_unique must be in \[1, 6\].*got 0"):
        sharing.assignment(6, 0, "cycle")
    with pytest.raises(ValueError, match=r"unknown sharing mode 'ring'.*'cycle_rev'"):
        sharing.assignment(6, 3, "ring")
    with pytest.raises(ValueError, match=r"got 4, valid: \[1, 2, 3, 6\]"):
        sharing.assignment(6, 4, "sequence")
    with pytest.raises(ValueError, match="num_unique must be 1, got 2"):
        sharing.assignment(6, 2, "all")


# ----------------------------------------------------------------------------- sharing a model
def test_all_positions_unique_is_the_original_model():
    model, batch = build("bert")
    for mode in ("sequence", "cycle", "cycle_rev"):
        assert sharing.assignment(N, N, mode) == tuple(range(N))
    shared, report = sharing.share_layers(model, N, MODE)
    np.testing.assert_array_equal(logits(shared, batch), logits(model, batch))
    assert report.params_after == report.params_before


def test_average_and_first_init():
    model, _ = build("bert")
    shared, _ = sharing.share_layers(model, M, MODE)
    first, _ = sharing.share_layers(model, M, MODE, init="first")
    for u, positions in enumerate([[0, 3], [1, 2]]):
        got, got_first = layer_params(shared, u), layer_params(first, u)
        for name, value in got.items():
            np.testing.assert_allclose(value, np.mean([layer_params(model, p)[name] for p in positions], 0),
                                       rtol=0, atol=1e-7)
            np.testing.assert_array_equal(got_first[name], layer_params(model, positions[0])[name])
    stack = F.layer_stack(shared)
    assert stack[0] is stack[3] and stack[1] is stack[2] and stack[0] is not stack[1]
    assert sharing.sharing_of(shared) == sharing.LayerSharing(MODE, M, (0, 1, 1, 0))
    assert sharing.sharing_of(model) is None and F.layer_stack(model)[0] is not F.layer_stack(model)[3]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_forward_equals_unshared_reference(kind):
    """The shared model = the original with every position's layer set to its unique layer's
    averaged weights (independent layers, no sharing)."""
    model, batch = build(kind)
    shared, _ = sharing.share_layers(model, M, MODE)
    reference = train.copy_model(model)
    for p, u in enumerate(sharing.assignment(N, M, MODE)):
        group = [q for q, v in enumerate(sharing.assignment(N, M, MODE)) if v == u]
        mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0),
                            *(nnx.state(F.layer_stack(model)[q], nnx.Param) for q in group))
        nnx.update(F.layer_stack(reference)[p], mean)
    np.testing.assert_allclose(logits(shared, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(logits(shared, batch)) - np.asarray(logits(model, batch))).max() > 1e-3


def test_report_counts():
    model, _ = build("bert")
    per_layer = sharing.unique_param_count(F.layer_stack(model)[0])
    shared, report = sharing.share_layers(model, M, MODE)
    assert (report.num_layers, report.num_unique, report.mode, report.assignment) == (N, M, MODE, (0, 1, 1, 0))
    assert report.params_before == sharing.param_count(model) == sharing.unique_param_count(model)
    assert report.params_after == sharing.unique_param_count(shared) == report.params_before - (N - M) * per_layer
    assert sharing.param_count(shared) == report.params_before
    assert report.nbytes_after == sharing.stored_nbytes(shared) == 4 * report.params_after  # float32
    assert f"{report.params_after:,}" in str(report)


def test_layers_of_different_width_cannot_share():
    model, _ = build("bert")
    pruned = F.resized(model, neurons=[list(range(24)), list(range(12))] * 2)
    with pytest.raises(ValueError, match=r"layers 0 and 1 would share.*ffn\.output\.kernel: layer 0 \(\(24, 16\)"):
        sharing.share_layers(pruned, 1, "all")
    shared, _ = sharing.share_layers(pruned, 2, "cycle")  # positions of one width share
    assert [F.num_neurons(shared, p) for p in range(N)] == [24, 12, 24, 12]
    assert F.layer_stack(shared)[1] is F.layer_stack(shared)[3]
    with pytest.raises(ValueError, match="unknown init 'mean'"):
        sharing.share_layers(model, M, MODE, init="mean")


# ----------------------------------------------------------------------------- training and saving
def test_gradient_of_shared_parameter_is_sum_over_positions():
    model, batch = build("bert")
    shared, _ = sharing.share_layers(model, M, MODE)

    def loss(m):
        return sq_loss(m, batch)[0]

    g_shared = flat(nnx.grad(loss)(shared))
    g_untied = flat(nnx.grad(loss)(sharing.untie(shared)))
    stack = F.layer_path(model, 0).rsplit(".", 1)[0]
    for u, positions in enumerate([[0, 3], [1, 2]]):
        keys = [k for k in g_shared if k.startswith(f"{stack}.{u}.")]
        assert len(keys) == len(layer_params(model, 0))
        for key in keys:
            rest = key[len(f"{stack}.{u}."):]
            summed = sum(g_untied[f"{stack}.{p}.{rest}"] for p in positions)
            np.testing.assert_allclose(g_shared[key], summed, rtol=1e-5, atol=1e-8)
    assert not any(k.startswith(f"{stack}.2.") or k.startswith(f"{stack}.3.") for k in g_shared)
    assert all(np.abs(g_untied[k.replace(f"{stack}.0.", f"{stack}.3.")]).max() > 0
               for k in g_shared if k.startswith(f"{stack}.0.") and "kernel" in k)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_train_step_keeps_layers_tied_and_save_load_round_trip(kind, tmp_path):
    model, batch = build(kind)
    shared, _ = sharing.share_layers(model, M, MODE)
    per_layer = len(jax.tree.leaves(nnx.state(F.layer_stack(model)[0], nnx.Param)))
    total = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert len(jax.tree.leaves(nnx.state(shared, nnx.Param))) == total - (N - M) * per_layer
    trained, _ = train.run(shared, sq_loss, optax.sgd(1.0), [batch], steps=1)
    stack = F.layer_stack(trained)
    assert stack[0] is stack[3] and stack[1] is stack[2] and stack[0] is not stack[1]
    assert len(jax.tree.leaves(nnx.state(trained, nnx.Param))) == total - (N - M) * per_layer
    assert sharing.sharing_of(trained) == sharing.sharing_of(shared)
    before, after = layer_params(shared, 1), layer_params(trained, 1)
    assert any(np.abs(after[k] - before[k]).max() > 0 for k in before)

    out = sharing.save(trained, tmp_path / "shared")
    labels = 3 if kind == "bert" else None
    loaded = sharing.load(out, num_labels=labels)
    np.testing.assert_array_equal(logits(loaded, batch), logits(trained, batch))
    assert sharing.sharing_of(loaded) == sharing.sharing_of(trained)
    stack = F.layer_stack(loaded)
    assert stack[0] is stack[3] and stack[1] is stack[2]
    plain = models.from_pretrained(out, num_labels=labels)  # a normal HF checkpoint: every position
    assert F.num_layers(plain) == N and F.layer_stack(plain)[0] is not F.layer_stack(plain)[3]
    np.testing.assert_array_equal(logits(plain, batch), logits(trained, batch))
    with open(os.path.join(out, sharing.SHARING_NAME)) as f:
        assert json.load(f) == {"mode": MODE, "num_unique": M, "assignment": [0, 1, 1, 0]}


def test_load_rejects_tied_layers_that_differ(tmp_path):
    model, _ = build("bert")
    out = sharing.save(sharing.share_layers(model, M, MODE)[0], tmp_path / "shared")
    tensors = read_safetensors(out)
    name = next(k for k in tensors if re.search(r"layers?\.3\..*weight$", k))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers 0 and 3 share one layer .* differ \(max \|diff\| 1\)"):
        sharing.load(out, num_labels=3)
    with pytest.raises(FileNotFoundError, match="no sharing.json"):
        sharing.load(models.save_hf_checkpoint(model, tmp_path / "plain"), num_labels=3)


def test_save_needs_a_shared_model_with_intact_ties(tmp_path):
    model, _ = build("bert")
    with pytest.raises(ValueError, match="shares no layers"):
        sharing.save(model, tmp_path / "a")
    shared, _ = sharing.share_layers(model, M, MODE)
    F.layer_stack(shared)[3] = nnx.clone(F.layer_stack(shared)[0])
    with pytest.raises(ValueError, match=r"positions \[0, 3\] to one layer, but position\(s\) \[3\]"):
        sharing.save(shared, tmp_path / "b")


def test_module_replacing_transforms_keep_a_shared_layer_shared():
    """LoRA, factorisation and the packed 4-bit base wrap a shared layer's Linears once: every
    position still runs the same (wrapped) module, and nothing is wrapped twice."""
    from efficient_nlp import lowrank, peft

    shared, _ = sharing.share_layers(tiny_bert(), 1, "all")
    lora, report = peft.add_lora(shared, roles=("q",))
    assert len(report.targets) == 1
    q0, q1 = (F.get_module(lora, F.site_path(lora, i, "q")) for i in (0, 1))
    assert q0 is q1 and not isinstance(q0.base, peft.LoraLinear)
    factorised, report = lowrank.factorize(shared, rank=2)
    assert len(report.rows) == len(F.family_of(shared).layer_sites)
    packed, report = peft.qlora.quantize_base(shared, block_size=8)
    assert len(report.sites) == len(F.family_of(shared).layer_sites)
    assert F.layer_stack(packed)[0] is F.layer_stack(packed)[1]
