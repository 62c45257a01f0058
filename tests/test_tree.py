"""efficient_nlp.tree: path-regex selection of pytree leaves."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, tree


def params():
    return {"enc": {"layers": [{"q": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}},
                               {"q": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}]},
            "head": {"kernel": jnp.ones((3, 1))}}


def test_names_are_dotted_paths_and_nnx_state_drops_the_variable_wrapper():
    assert tree.names(params()) == ["enc.layers.0.q.bias", "enc.layers.0.q.kernel",
                                    "enc.layers.1.q.bias", "enc.layers.1.q.kernel", "head.kernel"]
    cfg = models.BertConfig(vocab_size=11, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, max_position_embeddings=8)
    _, state = nnx.split(models.BertModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    names = tree.names(state)
    assert "bert.encoder.layers.0.attention.query.kernel" in names
    assert set(names) == set(models.named_params(models.BertModel(cfg, rngs=nnx.Rngs(0))))


def test_select_mask_and_labels_first_rule_wins():
    mask = tree.select(params(), r"layers\.\d+\.q\.kernel$")
    assert [bool(x) for x in np.array(list(map(bool, jax_leaves(mask))))] == [False, True, False, True, False]
    labels = tree.select(params(), [(r"layers\.1\..*kernel", "late"), (r"kernel$", "any")], default="none")
    assert jax_leaves(labels) == ["none", "any", "none", "late", "any"]
    assert tree.select(params(), {r"bias$": 1}, default=0)["enc"]["layers"][0]["q"]["bias"] == 1


def jax_leaves(t):
    import jax
    return jax.tree.leaves(t)


def test_bad_rules_fail_clearly():
    with pytest.raises(tree.RuleError, match=r"rule 0 'kernel\(' is not a valid regular expression"):
        tree.select(params(), "kernel(")
    with pytest.raises(tree.RuleError, match=r"rule 1 'qurey' matches no leaf.*enc\.layers\.0\.q\.bias"):
        tree.select(params(), ["kernel$", "qurey"])
    with pytest.raises(tree.RuleError, match="taken by an earlier rule"):
        tree.select(params(), ["kernel$", r"head\.kernel"])
    assert tree.match(params(), ["nothing"], allow_unused=True) == {}
    with pytest.raises(tree.RuleError, match="regex string or a"):
        tree.compile_rules([3])
