"""docs/extending.md runs as written, and each piece it registers is really used.

The ```python blocks of the guide are extracted from the Markdown and executed in order in one
namespace (the guide cannot drift from the code); the tests then check the registered quantizer,
pruning score, distillation loss and search space against direct computations.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import distill, models, nas, prune, quant
from efficient_nlp.distill import matches as matches_lib
from efficient_nlp.nas import spaces
from efficient_nlp.prune import _registry
from efficient_nlp.prune.scores import CRITERIA
from efficient_nlp.quant import spec as spec_lib

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "extending.md")
NAMES = dict(quantizer="pow2_scale", score="obd_fisher", loss="hidden_smooth_l1", space="mlp")


def python_blocks(path):
    with open(path) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def _unregister():
    spec_lib.QUANTIZERS.pop(NAMES["quantizer"], None)
    CRITERIA.pop(NAMES["score"], None)
    matches_lib.LOSSES.pop(NAMES["loss"], None)
    matches_lib.REGISTERED_LOSSES.pop(NAMES["loss"], None)
    spaces.SPACES.pop(NAMES["space"], None)


@pytest.fixture(scope="module")
def guide():
    """The namespace after executing every python block of docs/extending.md in order."""
    _unregister()
    namespace = {"__name__": "extending_guide"}
    for i, block in enumerate(python_blocks(GUIDE)):
        exec(compile(block, f"docs/extending.md[python block {i}]", "exec"), namespace)
    yield namespace
    _unregister()


def tiny_bert(num_layers=2, seed=0, cls=models.BertForSequenceClassification):
    cfg = models.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=num_layers,
                            num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return cls(cfg, rngs=nnx.Rngs(seed))


def tiny_batch(seed=0, b=3, t=8):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[0, 5:] = 0
    return {"input_ids": rng.integers(1, 64, (b, t)).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((b, t), np.int32), "labels": np.asarray([0, 1, 2], np.int32)}


def test_the_guide_registers_its_four_pieces(guide):
    assert len(python_blocks(GUIDE)) == 8
    assert spec_lib.QUANTIZERS[NAMES["quantizer"]] is guide["pow2_scale"]
    assert matches_lib.REGISTERED_LOSSES[NAMES["loss"]] is guide["hidden_smooth_l1"]
    assert matches_lib.LOSSES[NAMES["loss"]] == matches_lib.TOKEN_FEATURES
    assert spaces.SPACES[NAMES["space"]] is guide["mlp_space"]
    assert prune.get_criterion(NAMES["score"]).name == NAMES["score"]
    # the config path of each recipe resolved the new names
    assert guide["spec"].weight == quant.Quantizer("pow2_scale", 4, True, "tensor")
    assert guide["spec"].activation_unsigned == quant.Quantizer("pow2_scale", 8, False, "token")
    assert guide["space"].name == "mlp"


# ----------------------------------------------------------------------------- quantizer
def test_pow2_quantizer_puts_values_on_a_power_of_two_grid_with_identity_gradient(guide):
    fn = guide["pow2_scale"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
    for bits, signed, axis in ((4, True, None), (3, False, None), (4, True, 0)):
        x_hat = np.asarray(fn(x, bits, signed, axis))
        lo = 0.0 if signed else np.min(np.asarray(x), axis=axis, keepdims=True)
        qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        r = np.max(np.abs(np.asarray(x) - lo), axis=axis, keepdims=True)
        step = 2.0 ** np.ceil(np.log2(r / qmax))
        codes = (x_hat - lo) / step
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
        assert codes.min() >= (-(2 ** (bits - 1)) if signed else 0) - 1e-4 and codes.max() <= qmax + 1e-4
        assert np.all(np.abs(x_hat - np.asarray(x)) <= step + 1e-6)   # within one step (clipping included)
    c = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)
    grad = jax.grad(lambda v: jnp.sum(fn(v, 4, True, None) * c))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))


def test_registered_weight_quantizer_changes_the_model_exactly_as_its_function_says(guide):
    fn = guide["pow2_scale"]
    model = tiny_bert()
    qmodel, _ = quant.quantize_model(model, quant.make_spec(4, 4, 32, weight_method="pow2_scale"))
    reference = nnx.clone(model)
    sites = [(path, wq) for path, wq in quant.quantizer_modules(qmodel) if path.endswith(".weight_quant")]
    assert len(sites) == 2 * 6 + 2      # 6 matmuls per layer, the pooler, the word embedding
    for path, wq in sites:
        assert wq.quantizer.method == "pow2_scale"
        parent = reference
        for part in path.split(".")[:-1]:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        var = parent.embedding if isinstance(parent, nnx.Embed) else parent.kernel
        var.set_value(fn(var[...], 4, True, wq.axis))
    batch = tiny_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    got, want, fp = qmodel(*args).logits, reference(*args).logits, model(*args).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(got - fp))) > 1e-3   # the quantizer did change the model


def test_registered_activation_quantizer_quantizes_every_linear_input(guide):
    fn = guide["pow2_scale"]

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 5, rngs=rngs)
            self.b = nnx.Linear(5, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    model = Mlp(nnx.Rngs(0))
    qmodel, _ = quant.quantize_model(model, quant.make_spec(32, 32, 8, activation_method="pow2_scale"))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float32)
    h = jax.nn.relu(fn(x, 8, True, (1,)) @ model.a.kernel[...] + model.a.bias[...])
    want = fn(h, 8, True, (1,)) @ model.b.kernel[...] + model.b.bias[...]
    np.testing.assert_allclose(np.asarray(qmodel(x)), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_register_quantizer_refuses_taken_names_and_bad_signatures(guide):
    with pytest.raises(ValueError, match="already exists"):
        spec_lib.register_quantizer("twn", guide["pow2_scale"])
    with pytest.raises(ValueError, match="already exists"):
        spec_lib.register_quantizer("pow2_scale", guide["pow2_scale"])
    with pytest.raises(ValueError, match=r"fn\(x, bits, signed, axis\)"):
        spec_lib.register_quantizer("two_args", lambda x, bits: x)
    with pytest.raises(ValueError, match="register_quantizer"):
        quant.Quantizer("no_such_method", 4)


def test_packed_export_refuses_a_registered_quantizer_clearly(guide):
    qmodel, _ = quant.quantize_model(tiny_bert(), quant.make_spec(4, 4, 32, weight_method="pow2_scale"))
    with pytest.raises(ValueError, match="pow2_scale"):
        quant.export_packed(qmodel)
    with pytest.raises(ValueError, match="pow2_scale"):
        quant.to_integer_model(qmodel)


# ----------------------------------------------------------------------------- pruning score
def test_registered_score_prunes_the_lowest_running_sum_of_the_score(guide):
    rng = np.random.default_rng(0)
    params = {"layers": {"0": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                               "bias": jnp.zeros((6,), jnp.float32)}}}
    rules = [prune.rule(r"layers\.\d+\.kernel$", "unstructured", 0.75)]
    tx = prune.pruning(optax.sgd(0.1), rules, criterion="obd_fisher", schedule=prune.one_shot(3))
    state = tx.init(params)
    initial = np.abs(np.asarray(params["layers"]["0"]["kernel"]))
    running = np.zeros((8, 6))
    for t in range(3):
        grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
        running += (np.asarray(params["layers"]["0"]["kernel"]) * np.asarray(grads["layers"]["0"]["kernel"])) ** 2
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    mask = np.asarray(prune.get_masks(state)["layers"]["0"]["kernel"])
    want = running >= np.sort(running.ravel())[-12]          # keep the 25% (12 of 48) highest sums
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(np.asarray(params["layers"]["0"]["kernel"]) != 0, want)
    assert not np.array_equal(want, initial >= np.sort(initial.ravel())[-12])  # not magnitude pruning


def test_register_score_refuses_taken_names_and_bad_signatures(guide):
    with pytest.raises(ValueError, match="already exists"):
        _registry.register_score("movement", guide["obd_fisher"])
    with pytest.raises(ValueError, match=r"fn\(params, grads\)"):
        _registry.register_score("one_arg", lambda params: params)
    with pytest.raises(ValueError, match="obd_fisher"):   # unknown names list the registered one
        prune.get_criterion("no_such_score")


# ----------------------------------------------------------------------------- distillation loss
def _distiller(match_dicts):
    teacher, student = tiny_bert(4, seed=1), tiny_bert(2, seed=2)
    checked = distill.check_matches(match_dicts, student.config, teacher.config)
    return distill.Distiller(student, teacher, checked, rngs=nnx.Rngs(0)), checked


def test_registered_loss_enters_the_distillation_loss_with_its_weight(guide):
    fn = guide["hidden_smooth_l1"]
    model, checked = _distiller([
        dict(feature="hidden", loss="hidden_smooth_l1", student_layer=1, teacher_layer=2, weight=2.0),
        dict(feature="logits", loss="kl")])
    batch = tiny_batch()
    total, aux = distill.make_distill_loss(checked)(model, batch, nnx.Rngs(dropout=0))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    hs = model.student(*args, capture=("hidden_states",)).intermediates["hidden_states"][1]
    ht = model.teacher(*args, capture=("hidden_states",)).intermediates["hidden_states"][2]
    want = fn(hs, ht, batch["attention_mask"])
    np.testing.assert_allclose(float(aux["distill/hidden1_2/hidden_smooth_l1"]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(total), 2.0 * float(want) + float(aux["distill/logits/kl"]), rtol=1e-6)


def test_registered_loss_is_checked_like_a_built_in_one(guide):
    teacher, student = tiny_bert(4, seed=1), tiny_bert(2, seed=2)
    with pytest.raises(ValueError, match="takes features"):
        distill.check_matches([dict(feature="logits", loss="hidden_smooth_l1")], student.config, teacher.config)
    with pytest.raises(ValueError, match="projection is only for"):
        distill.check_matches([dict(feature="hidden", loss="hidden_smooth_l1", student_layer=1,
                                    teacher_layer=2, projection=True)], student.config, teacher.config)
    with pytest.raises(ValueError, match="already exists"):
        matches_lib.register_loss("kl", guide["hidden_smooth_l1"], ["logits"])
    with pytest.raises(ValueError, match="must be a non-empty list"):
        matches_lib.register_loss("bad_feature", guide["hidden_smooth_l1"], ["no_such_feature"])
    with pytest.raises(ValueError, match=r"fn\(student, teacher, mask\)"):
        matches_lib.register_loss("two_args", lambda s, t: 0.0, ["hidden"])


# ----------------------------------------------------------------------------- search space
def test_registered_space_has_the_hand_counted_flops_and_choices(guide):
    space = guide["space"]
    assert space.decisions == ("hidden0", "hidden1")
    assert space.candidates == ((16, 32, 64), (8, 16, 32))
    for a1 in range(3):
        for a2 in range(3):
            h1, h2 = space.candidates[0][a1], space.candidates[1][a2]
            assert space.flops(np.asarray([a1, a2])) == 2 * (64 * h1 + h1 * h2 + 10 * h2)
            assert space.describe([a1, a2]) == {"hidden0": h1, "hidden1": h2}
    assert space.flops.max() == 2 * (64 * 64 + 64 * 32 + 10 * 32)
    assert len(space.data["search_train"]["labels"]) + len(space.data["val"]["labels"]) == \
        len(space.data["train"]["labels"])


def test_registered_space_supernet_computes_the_inherited_child_exactly(guide):
    """Ordinal sharing: the supernet at ``arch`` is the child (widths 32, 8) whose kernels are
    the candidate kernels ``W^{i,o}``."""
    space, arch = guide["space"], (1, 0)
    supernet = space.supernet("ordinal", 0)
    child = space.child(arch, supernet, 0)
    assert (child.fc1.kernel.shape, child.fc2.kernel.shape, child.head.kernel.shape) == \
        ((64, 32), (32, 8), (8, 10))
    for name, i, o in (("fc1", None, arch[0]), ("fc2", arch[0], arch[1]), ("head", arch[1], None)):
        src, dst = getattr(supernet, name), getattr(child, name)
        dst.kernel.set_value(src.candidate_kernel(i, o))
        dst.bias.set_value(src.candidate_bias(o))
    batch = {k: v[:16] for k, v in space.data["val"].items()}
    want = space.child_logits(child, batch)
    got = space.supernet_logits(supernet, batch, jnp.asarray(arch))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unknown_space_kind_lists_the_registered_one(guide):
    config = guide["config"]
    config.space.kind = "no_such_space"
    try:
        with pytest.raises(ValueError, match="'mlp'"):
            nas.build_space(config)
    finally:
        config.space.kind = "mlp"
    with pytest.raises(ValueError, match="already exists"):
        spaces.register_space("cnn", guide["mlp_space"])
    with pytest.raises(ValueError, match=r"fn\(space_config, seed\)"):
        spaces.register_space("one_arg", lambda space_config: None)


@pytest.mark.slow
def test_registered_space_runs_through_the_nas_recipe(guide, tmp_path):
    from efficient_nlp.recipes import nas as nas_recipe

    config = guide["config"]
    config.search.num_steps, config.search.batch_size, config.search.log_every = 30, 32, 10
    config.search.checkpoint_every, config.search.async_checkpointing = 30, False
    config.retrain.num_steps, config.retrain.eval_every, config.retrain.checkpoint_every = 30, 30, 30
    results = nas_recipe.run(config, str(tmp_path))
    h1, h2 = results["chosen"]["hidden0"], results["chosen"]["hidden1"]
    assert h1 in (16, 32, 64) and h2 in (8, 16, 32)
    assert results["chosen_flops"] == 2 * (64 * h1 + h1 * h2 + 10 * h2)
    assert 0.0 <= results["test_accuracy"] <= 1.0
