"""Every transform on tiny decoders (a Llama-style model with grouped-query attention and an
untied head; a GPT-2 model with a tied head): quantized == integer path, packed round trip,
REM / MREM-S / MREM-P, head (KV-group) / neuron / layer pruning with shrink == masked, and
distillation with per-token logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import distill, prune, quant, tree
from efficient_nlp.models import family as F
from efficient_nlp.quant import mrem, ptq
from efficient_nlp.quant.mrem_parallel import module_slice

from _tiny import lm_batch, logits, tiny_decoder  # tests/_tiny.py

V, T = 50, 10
KINDS = ("llama", "gpt2")


def tiny(kind="llama", layers=2, seed=0):
    return tiny_decoder(kind, vocab=V, layers=layers, seed=seed)


def batch(n=8, seed=0):
    return lm_batch(n, T, V, seed)


def valid(x, b):
    return np.asarray(x)[np.asarray(b["attention_mask"]) > 0]


@pytest.mark.parametrize("kind", KINDS)
def test_integer_model_equals_fake_quant_and_packed_round_trip(kind):
    model, b = tiny(kind), batch()
    qmodel, report = quant.quantize_model(model, quant.make_spec(4, 4, 8, activation_method="lsq"))
    quant.calibrate(qmodel, b)
    rows = {site: q for site, q, _ in report.rows}
    assert rows[F.site_path(model, 0, "q") + ".input"] == "lsq8"
    if kind == "llama":
        assert rows[F.site_path(model, 1, "ffn_gate")] == "uniform4/ch" and rows["lm_head"] == "uniform4/ch"
    imodel, ireport = quant.to_integer_model(qmodel)
    fake, integer = valid(logits(qmodel, b), b), valid(logits(imodel, b), b)
    np.testing.assert_allclose(integer, fake, rtol=1e-4, atol=1e-5 * np.abs(fake).max())
    if kind == "gpt2":  # the tied head reads the quantized word-embedding table
        table = F.get_module(qmodel, F.word_embedding_path(qmodel)).table()
        h = F.forward(qmodel, b).last_hidden_state
        np.testing.assert_allclose(np.asarray(logits(qmodel, b)), np.asarray(h @ table.T), rtol=1e-5, atol=1e-5)
    artifact = quant.export_packed(qmodel)
    template, _ = quant.quantize_model(tiny(kind, seed=7), quant.make_spec(4, 4, 8, activation_method="lsq"))
    restored = quant.restore(artifact, template)
    np.testing.assert_array_equal(np.asarray(logits(restored, b)), np.asarray(logits(qmodel, b)))


@pytest.mark.slow  # one compilation per site (~45 s); the encoder families' REM test is in the fast suite
def test_rem_reduces_every_matmul_error_of_a_decoder():
    teacher, calib = tiny("llama", layers=1), batch(16)
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(2, 2, 8, activation_method="lsq"))
    quant.calibrate(qmodel, calib)
    out, report, _ = ptq.rem(qmodel, teacher, calib, steps=30, learning_rate=1e-4, token_batch_size=64, log=None)
    assert [r["site"] for r in report] == [s.path for s in F.sites(teacher)] + ["lm_head"]
    for r in report:
        assert r["after"] < r["before"], r


@pytest.mark.parametrize("kind", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_mrem_modules_cover_every_layer_and_slices_run_like_the_model(kind):
    teacher, calib = tiny(kind, layers=3), batch()   # 8 rows: MREM-S splits a batch over up to 8 devices
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(4, 4, 8, activation_method="lsq"))
    quant.calibrate(qmodel, calib)
    mods = mrem.modules(3, 2)
    assert sorted(i for m in mods for i in range(m.start, m.stop)) == [0, 1, 2]
    b = {k: jnp.asarray(v) for k, v in calib.items()}
    h = F.embed(teacher, b)
    for mod in mods:
        sub, local = module_slice(qmodel, mod)
        full, part = mrem.module_forward(qmodel, mod, b, h), mrem.module_forward(sub, local, b, h)
        assert ("logits" in full) == mod.last
        for a, c in zip(jax.tree.leaves(full), jax.tree.leaves(part)):
            np.testing.assert_array_equal(a, c)
        h = full["out"]
    out, report, _ = mrem.mrem_s(qmodel, teacher, calib, num_modules=2, steps=10, batch_size=8, log=None)
    assert [r["layers"] for r in report] == [[0, 2], [2, 3]]
    assert report[-1]["loss_after"] < report[-1]["loss_before"]


def _masked(model, masks):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, prune.apply_masks(params, masks), rest)


@pytest.mark.parametrize("kind", KINDS)
def test_heads_kv_groups_neurons_and_layers_shrink_equals_masked(kind):
    model, b = tiny(kind), batch()
    params = nnx.split(model, nnx.Param, ...)[1]
    heads = "|".join([prune.site_regex(model, ("q", "k", "v"), "(kernel|bias)"), prune.site_regex(model, ("o",))])
    ffn = "|".join([prune.site_regex(model, ("ffn_in", "ffn_gate"), "(kernel|bias)"),
                    prune.site_regex(model, ("ffn_out",))])
    rules = [prune.rule(heads, "heads", 0.5, "uniform", family=model),
             prune.rule(ffn, "ffn_neurons", 0.5, "uniform", family=model)]
    pruned = _masked(model, prune.make_masks(params, rules))
    st = prune.structure_of(pruned)
    group = 2 if kind == "llama" else 1  # 4 query heads share 2 key/value heads
    for kept in st["heads"]:
        assert len(kept) == 2 and all(h // group in {k // group for k in kept} for h in kept)
        assert sorted(kept) == sorted({g * group + j for g in {h // group for h in kept} for j in range(group)})
    assert [len(n) for n in st["neurons"]] == [12, 12]
    small, _ = prune.shrink(pruned)
    if kind == "llama":
        assert small.config.layer_num_key_value_heads == (1, 1)
    np.testing.assert_allclose(valid(logits(small, b), b), valid(logits(pruned, b), b), atol=1e-5)
    named = prune.structure_masks(model, st)
    again = _masked(model, jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.asarray(named.get(tree.path_str(p), True)), params))
    np.testing.assert_allclose(valid(logits(again, b), b), valid(logits(pruned, b), b), atol=1e-6)
    one = prune.make_masks(params, [prune.rule(prune.site_regex(model), "layers", 0.5, family=model)])
    small, st = prune.shrink(model, masks=one)
    assert len(st["layers"]) == 1 and F.num_layers(small) == 1


def test_next_token_loss_matches_a_reference():
    b = batch(4)
    z = np.random.default_rng(1).normal(size=(4, T, V)).astype(np.float32)
    loss, acc = distill.next_token_loss(jnp.asarray(z), b["input_ids"], b["attention_mask"])
    nll, hits = [], []
    for r in range(4):
        for t in range(T - 1):
            if b["attention_mask"][r, t] and b["attention_mask"][r, t + 1]:
                p = z[r, t] - z[r, t].max()
                nll.append(np.log(np.exp(p).sum()) - p[b["input_ids"][r, t + 1]])
                hits.append(z[r, t].argmax() == b["input_ids"][r, t + 1])
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(float(acc), np.mean(hits))


def test_distilling_a_shallower_decoder_student_per_token():
    teacher, b = tiny("llama", layers=3), batch()
    student = distill.student_from_teacher(teacher, [0, 2])
    assert student.config.layer_num_key_value_heads == (2, 2) or student.config.num_kv_heads == 2
    matches = distill.check_matches([{"feature": "logits", "loss": "kl"},
                                     {"feature": "hidden", "loss": "hidden_mse", "student_layer": 1,
                                      "teacher_layer": 2}], student.config, teacher.config)
    model = distill.Distiller(student, teacher, matches, rngs=nnx.Rngs(0))
    loss_fn = distill.make_distill_loss(matches, hard_label_weight=0.5)
    loss, aux = loss_fn(model, {k: jnp.asarray(v) for k, v in b.items()}, nnx.Rngs(dropout=0))
    s, t = logits(student, b), logits(teacher, b)
    kl = jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s)), -1)
    mask = jnp.asarray(b["attention_mask"])
    np.testing.assert_allclose(float(aux["distill/logits/kl"] if "distill/logits/kl" in aux else
                                     [v for k, v in aux.items() if k.startswith("distill/logits")][0]),
                               float(jnp.sum(kl * mask) / jnp.sum(mask)), rtol=1e-5)
    hard, _ = distill.next_token_loss(s, b["input_ids"], b["attention_mask"])
    np.testing.assert_allclose(float(aux["hard_loss"]), float(hard), rtol=1e-5)


def test_layer_drop_and_layer_removal_on_a_decoder():
    model, b = tiny("llama"), batch(4)
    prune.with_layer_drop(model, 1.0)  # every layer skipped while training: the final norm of the embedding
    out = F.forward(model, b, deterministic=False, rngs=nnx.Rngs(dropout=0)).last_hidden_state
    np.testing.assert_allclose(np.asarray(out), np.asarray(model.backbone.final_norm(F.embed(model, b))), atol=1e-6)
    prune.with_layer_drop(model, 0.0)
    small, st = prune.remove_layers(model, keep=[1])
    assert st["layers"] == [1] and F.num_layers(small) == 1
    h = F.run_layers(model, F.embed(model, b), jnp.asarray(b["attention_mask"]), start=1, stop=2)[0]
    np.testing.assert_allclose(valid(logits(small, b), b), valid(F.head(model, h), b), atol=1e-5)
