"""Pruning reads the model family description: on BERT exactly what the former BERT-path code
did (its logic inlined here as the reference), and the same transforms on tiny RoBERTa and
DistilBERT models."""
import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, prune
from efficient_nlp.models import family as F
from efficient_nlp.prune import fewshot
from efficient_nlp.prune.patterns import Pattern, _axis_expand, _axis_units

D = 4  # head width: 4 heads of 4 in a hidden size of 16
KINDS = {"bert": {}, "roberta": dict(pad_token_id=1, type_vocab_size=1), "distilbert": dict(type_vocab_size=0)}
_MODELS = {}


def tiny(kind="bert"):
    """A fresh copy of one tiny classifier per family (built once)."""
    if kind not in _MODELS:
        cfg = models.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=24, max_position_embeddings=40, num_labels=3,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, model_type=kind,
                                **KINDS[kind])
        _MODELS[kind] = models.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    return nnx.clone(_MODELS[kind])


def batch(n=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((n, t), np.int32)
    mask[1, 5:] = 0
    return {"input_ids": rng.integers(2, 50, (n, t)).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((n, t), np.int32), "labels": rng.integers(0, 3, n).astype(np.int32)}


def logits(model, b):
    return np.asarray(F.forward(model, b).logits)


def params_of(model):
    return nnx.split(model, nnx.Param, ...)[1]


def masked(model, masks):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, prune.apply_masks(params, masks), rest)


def unit_rules(model, head_sparsity=0.5, ffn_sparsity=0.5, distribution="uniform"):
    """Head and FFN-neuron rules written from the family's sites (no parameter path named)."""
    heads = "|".join([prune.site_regex(model, ("q", "k", "v"), "(kernel|bias)"), prune.site_regex(model, ("o",))])
    ffn = "|".join([prune.site_regex(model, ("ffn_in",), "(kernel|bias)"), prune.site_regex(model, ("ffn_out",))])
    return [prune.rule(heads, "heads", head_sparsity, distribution, family=model),
            prune.rule(ffn, "ffn_neurons", ffn_sparsity, distribution, family=model)]


# ----------------------------------------------------------------------------- the former BERT logic
@dataclasses.dataclass(frozen=True)
class OldHeads(Pattern):
    """The BERT-path heads pattern this package had (the reference)."""

    head_dim: int = D

    def _axis(self, name):
        m = re.search(r"\.(query|key|value|output)\.(kernel|bias)$", name)
        return 0 if m.group(2) == "bias" or m.group(1) == "output" else 1

    def group_key(self, name, shape):
        return name[: name.rfind(".", 0, name.rfind("."))]

    def reduce(self, name, x):
        return _axis_units(x, self._axis(name), self.head_dim)

    def expand(self, name, unit_mask, shape):
        return _axis_expand(unit_mask, self._axis(name), self.head_dim, shape)


@dataclasses.dataclass(frozen=True)
class OldFFN(OldHeads):
    head_dim: int = 1

    def _axis(self, name):
        return 1 if name.endswith(".intermediate.kernel") else 0


@dataclasses.dataclass(frozen=True)
class OldLayers(Pattern):
    def group_key(self, name, shape):
        return re.match(r"^(.*?layers\.\d+)\.", name).group(1)

    def reduce(self, name, x):
        return jnp.sum(x).reshape(1)

    def expand(self, name, unit_mask, shape):
        return jnp.broadcast_to(unit_mask.reshape((1,) * len(shape)), shape)


OLD_HEADS = r"attention\.(query|key|value)\.(kernel|bias)$|attention\.output\.kernel$"
OLD_FFN = r"ffn\.(intermediate\.(kernel|bias)|output\.kernel)$"
OLD_KERNELS = ("attention.query", "attention.key", "attention.value", "attention.output", "ffn.intermediate",
               "ffn.output")


def old_structure_of(model):
    params = {k: np.asarray(v.get_value()) for k, v in models.named_params(model).items()}
    out = {"layers": [], "heads": [], "neurons": []}
    for i in range(len(model.bert.encoder.layers)):
        p = f"bert.encoder.layers.{i}."
        if all(not np.any(params[p + k + ".kernel"]) for k in OLD_KERNELS):
            continue
        o = params[p + "attention.output.kernel"]
        out["layers"].append(i)
        out["heads"].append([h for h in range(o.shape[0] // D) if np.any(o[h * D:(h + 1) * D])])
        out["neurons"].append([int(j) for j in np.flatnonzero(np.any(params[p + "ffn.output.kernel"], axis=1))])
    return out


@pytest.mark.parametrize("distribution,sparsity", [("global", 0.5), ("uniform", 0.25), ("erk", 0.6)])
def test_bert_masks_groups_and_structure_are_those_of_the_bert_path_code(distribution, sparsity):
    model = tiny()
    params = params_of(model)
    for regex, new, old in ((OLD_HEADS, prune.heads(D), OldHeads()), (OLD_FFN, prune.ffn_neurons(), OldFFN()),
                            (r"layers\.\d+\..*kernel$", prune.layers(), OldLayers())):
        rules = [(regex, prune.PruneRule(new, sparsity, distribution))]
        ref = [(regex, prune.PruneRule(old, sparsity, distribution))]
        got, want = prune.make_masks(params, rules), prune.make_masks(params, ref)
        jax.tree.map(np.testing.assert_array_equal, got, want)
        assert ([(g.key, g.members) for g in prune.make_plan(params, rules).groups.values()]
                == [(g.key, g.members) for g in prune.make_plan(params, ref).groups.values()])
        small = masked(model, got)
        assert prune.structure_of(small) == prune.structure_of(model, got) == old_structure_of(small)


def test_bert_few_shot_adapter_has_the_bert_path_layers_and_inputs():
    model, b = tiny(), batch()
    subs = {"attention.query": "hidden_states", "attention.key": "hidden_states", "attention.value": "hidden_states",
            "attention.output": "context", "ffn.intermediate": "mha_out", "ffn.output": "ffn_intermediate"}
    adapter = fewshot.encoder_adapter(model, fewshot.encoder_rules(model))
    assert [s.name for s in adapter.layers] == [f"bert.encoder.layers.{i}.{sub}" for i in range(2) for sub in subs]
    feats = fewshot.run_model(adapter.features, model, {k: v for k, v in b.items() if k != "labels"})
    out = model(b["input_ids"], b["attention_mask"], capture=tuple(set(subs.values()))).intermediates
    for i in range(2):
        for sub, src in subs.items():
            np.testing.assert_allclose(feats[f"bert.encoder.layers.{i}.{sub}"], out[src][i], atol=1e-6)
    structured = fewshot.encoder_adapter(model, fewshot.encoder_rules(model, "structured"))
    assert [(s.name, s.pattern.name) for s in structured.layers] == [
        (f"bert.encoder.layers.{i}.{sub}", pat) for i in range(2)
        for sub, pat in (("attention.output", "heads"), ("ffn.output", "neurons"))]
    assert structured.layers[0].pattern.head_dim == D


# ----------------------------------------------------------------------------- every family
@pytest.mark.parametrize("kind", list(KINDS))
def test_patterns_shrink_and_structure_masks_on_each_family(kind):
    model, b = tiny(kind), batch()
    params = params_of(model)
    masks = prune.make_masks(params, unit_rules(model))
    plan = prune.make_plan(params, unit_rules(model))
    stack = F.family_of(model).path(F.family_of(model).layers)
    assert sorted(g.key for g in plan.groups.values()) == [f"{stack}.{i}.{m}" for i in range(2)
                                                          for m in ("attention", "ffn")]
    pruned = masked(model, masks)
    st = prune.structure_of(pruned)
    assert [len(h) for h in st["heads"]] == [2, 2] and [len(n) for n in st["neurons"]] == [12, 12]
    small, got = prune.shrink(pruned)
    assert got == st and small.config.model_type == kind
    assert [F.head_layout(small, i).num_heads for i in range(2)] == [2, 2]
    np.testing.assert_allclose(logits(small, b), logits(pruned, b), atol=1e-6)
    again = masked(model, _tree(params, prune.structure_masks(model, st)))
    assert prune.structure_of(again) == st
    np.testing.assert_allclose(logits(again, b), logits(pruned, b), atol=1e-6)
    one = prune.make_masks(params, [prune.rule(prune.site_regex(model), "layers", 0.5, family=model)])
    small, st = prune.shrink(model, masks=one)
    assert len(st["layers"]) == 1 and F.num_layers(small) == 1


def _tree(params, named):
    from efficient_nlp import tree
    return jax.tree_util.tree_map_with_path(lambda p, w: jnp.asarray(named.get(tree.path_str(p), True)), params)


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_slimming_gates_and_layer_drop_on_each_family(kind):
    model, b = tiny(kind), batch()
    gates = jax.tree.map(np.array, prune.init_gates(model))
    assert [len(g) for g in gates["heads"].values()] == [4, 4] and [len(g) for g in gates["ffn"].values()] == [24, 24]
    gates["heads"]["0"][[1, 3]] = 0
    gates["ffn"]["1"][:10] = 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    gated = nnx.merge(graphdef, prune.apply_gates(params, gates, D), rest)
    st = prune.gate_structure(model, jax.tree.map(lambda g: g != 0, gates))
    assert st["heads"][0] == [0, 2] and st["neurons"][1] == list(range(10, 24))
    small, _ = prune.shrink(model, structure=st)
    np.testing.assert_allclose(logits(small, b), logits(gated, b), atol=1e-6)
    np.testing.assert_array_equal(logits(prune.Slimming(model), b), logits(model, b))
    prune.with_layer_drop(model, 1.0)  # every layer skipped while training: the output is the input
    out = F.forward(model, b, deterministic=False, rngs=nnx.Rngs(dropout=0)).last_hidden_state
    np.testing.assert_array_equal(out, F.embed(model, b))
    small, st = prune.remove_layers(model, [1])
    assert st["layers"] == [1] and F.num_layers(small) == 1


@pytest.mark.parametrize("kind,structure", [("roberta", "unstructured"), ("distilbert", "structured")])
def test_few_shot_pruning_on_each_family(kind, structure):
    model, b = tiny(kind), batch()
    adapter = fewshot.encoder_adapter(model, fewshot.encoder_rules(model, structure))
    roles = ("o", "ffn_out") if structure == "structured" else F.LAYER_ROLES
    assert [s.name for s in adapter.layers] == [s.path for s in F.sites(model, roles)]
    if structure == "unstructured":  # two sites per layer keep it fast (one compilation per layer)
        adapter = fewshot.encoder_adapter(model, [(prune.site_regex(model, ("v", "ffn_in"), None),
                                                   prune.unstructured())])
        assert [s.name for s in adapter.layers] == [s.path for s in F.sites(model, ("v", "ffn_in"))]
    student, info = fewshot.prune_layerwise(model, adapter, b, loss="cd", sparsity=0.5, steps=2)
    assert [lay["sparsity"] for lay in info["layers"]] == [0.5] * len(adapter.layers)
    assert np.isfinite(fewshot.accuracy(adapter, student, b))
    if structure == "structured":
        small, st = prune.shrink(student)
        assert [len(h) for h in st["heads"]] == [2, 2] and [len(n) for n in st["neurons"]] == [12, 12]
        np.testing.assert_allclose(logits(small, b), logits(student, b), atol=1e-5)


# ----------------------------------------------------------------------------- errors, FLOPs, argument order
def test_a_family_without_a_role_fails_clearly(monkeypatch):
    bert = F.get_family("bert")
    sites = {r: s for r, s in bert.layer_sites.items() if r != "o"}
    fam = dataclasses.replace(bert, name="no_o", model_types=("no_o",), layer_sites=sites,
                              site_inputs={r: bert.site_inputs[r] for r in sites})
    monkeypatch.setitem(F._FAMILIES, "no_o", fam)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="no_o"))
    for fn in (prune.structure_of, prune.shrink, prune.init_gates, lambda m: fewshot.encoder_rules(m, "structured")):
        with pytest.raises(F.FamilyError, match=r"\['o'\]"):
            fn(fake)
    with pytest.raises(prune.PatternError, match="heads pattern applies to"):
        prune.make_masks(params_of(tiny()), [prune.rule(OLD_HEADS, "heads", 0.5, head_dim=D, family="no_o")])


def test_flops_count_a_gated_ffn_and_rules_come_first():
    cfg, t = tiny().config, 8
    assert prune.flops(cfg, t) == prune.flops(cfg, t, gated=False)  # BERT has no ffn_gate
    assert prune.flops(cfg, t, gated=True) - prune.flops(cfg, t) == 2 * t * 16 * 24 * 2
    assert prune.unit_flops(cfg, t, gated=True)[1] == 2 * t * 16 * 3
    with pytest.raises(TypeError, match="rules come first"):
        prune.l1_soft_threshold(0.5, r"kernel$")
    with pytest.raises(TypeError, match="rules come first"):
        prune.group_soft_threshold(0.5, [(OLD_HEADS, prune.heads(D))])


def test_flops_and_unit_costs_agree_with_the_one_flops_counter():
    from efficient_nlp.models.flops import forward_flops, layer_flops
    t = 8
    for kind in ("bert", "roberta", "distilbert"):
        cfg = tiny(kind).config
        assert prune.flops(cfg, t) == forward_flops(cfg, t, classifier=False)
        head, neuron = prune.unit_flops(cfg, t)
        fewer_head = cfg.replace(layer_num_attention_heads=(3, 4), layer_intermediate_sizes=(24, 24))
        fewer_neuron = cfg.replace(layer_num_attention_heads=(4, 4), layer_intermediate_sizes=(23, 24))
        assert layer_flops(cfg, 0, t) - layer_flops(fewer_head, 0, t) == head
        assert layer_flops(cfg, 0, t) - layer_flops(fewer_neuron, 0, t) == neuron
    electra = tiny().config.replace(model_type="electra", embedding_size=8)
    assert prune.flops(electra, t) == forward_flops(electra, t)
