"""Low-rank factorisation: (weighted) truncated SVD against NumPy float64 references, rank choice,
the factorised modules and transforms on encoder and decoder families, save / load, composition
with quantization."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import lm_batch, logits, tiny_bert, tiny_decoder, token_batch
from flax import nnx

from efficient_nlp import lowrank, quant, train
from efficient_nlp.lowrank import svd
from efficient_nlp.models import family as F
from efficient_nlp.prune import count_params
from efficient_nlp.tree import RuleError


def kernel(seed, d_in=24, d_out=16, decay=None):
    """A random [d_in, d_out] kernel; ``decay``: singular values decay**i (orthogonal factors)."""
    rng = np.random.default_rng(seed)
    if decay is None:
        return rng.normal(size=(d_in, d_out)).astype(np.float32)
    k = min(d_in, d_out)
    u, _ = np.linalg.qr(rng.normal(size=(d_in, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d_out, k)))
    return ((u * decay ** np.arange(k)) @ v.T).astype(np.float32)


def weighted_err(w, approx, row=None, col=None):
    """||diag(row) (W - X) diag(col)||_F^2 in float64."""
    d = np.asarray(w, np.float64) - np.asarray(approx, np.float64)
    d = d if row is None else d * np.asarray(row, np.float64)[:, None]
    d = d if col is None else d * np.asarray(col, np.float64)[None, :]
    return float(np.sum(d * d))


def models_by_kind():
    return {"bert": (tiny_bert(), token_batch(2, 8, 50)), "llama": (tiny_decoder("llama"), lm_batch(2, 9, 61)),
            "gpt2": (tiny_decoder("gpt2"), lm_batch(2, 9, 61))}


KINDS = ("bert", "llama", "gpt2")


@pytest.fixture(scope="module")
def tiny():
    return models_by_kind()


def diff(m1, m2, batch):
    return float(np.max(np.abs(np.asarray(logits(m1, batch)) - np.asarray(logits(m2, batch)))))


# ----------------------------------------------------------------------------- pure SVD
@pytest.mark.parametrize("weights", ["none", "row", "col", "both"])
def test_full_rank_reproduces_the_kernel_and_the_layer(weights):
    w = kernel(0)
    rng = np.random.default_rng(1)
    row = rng.uniform(0.2, 3, 24).astype(np.float32) if weights in ("row", "both") else None
    col = rng.uniform(0.2, 3, 16).astype(np.float32) if weights in ("col", "both") else None
    a, b = svd.truncated(w, 16, row_scale=row, col_scale=col)
    np.testing.assert_allclose(a @ b, w, atol=1e-5)
    linear = nnx.Linear(24, 16, rngs=nnx.Rngs(0))
    linear.kernel.set_value(jnp.asarray(w))
    linear.bias.set_value(jnp.asarray(rng.normal(size=16), jnp.float32))
    low = lowrank.LowRankLinear.from_factors(linear, a, b)
    x = jnp.asarray(rng.normal(size=(5, 24)), jnp.float32)
    np.testing.assert_allclose(low(x), linear(x), rtol=1e-5, atol=1e-5)


def test_truncated_is_eckart_young_with_balanced_factors():
    w = kernel(2)
    a, b = svd.truncated(w, 5)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert weighted_err(w, a @ b) == pytest.approx(np.sum(s[5:] ** 2), rel=1e-4)
    # sqrt(S) in both factors: equal column / row norms
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0) ** 2, s[:5], rtol=1e-4)


def test_weighted_svd_is_optimal_in_the_weighted_norm_and_beats_plain_svd():
    w = kernel(3)
    rng = np.random.default_rng(4)
    row, col = rng.uniform(0.1, 5, 24), rng.uniform(0.1, 5, 16)
    plain_a, plain_b = svd.truncated(w, 4)
    for kw in ({"row_scale": row}, {"col_scale": col}, {"row_scale": row, "col_scale": col}):
        a, b = svd.truncated(w, 4, **kw)
        r, c = kw.get("row_scale"), kw.get("col_scale")
        m = np.asarray(w, np.float64) * (1 if r is None else r[:, None]) * (1 if c is None else c[None, :])
        tail = np.sum(np.linalg.svd(m, compute_uv=False)[4:] ** 2)
        assert weighted_err(w, a @ b, r, c) == pytest.approx(tail, rel=1e-4)
        assert weighted_err(w, a @ b, r, c) < 0.95 * weighted_err(w, plain_a @ plain_b, r, c)


def test_rank_for_energy_is_the_smallest_rank_reaching_the_target():
    s = np.sort(np.random.default_rng(5).uniform(0, 1, 40))[::-1]
    cum = np.cumsum(s ** 2) / np.sum(s ** 2)
    for e in (0.1, 0.5, 0.9, 0.99, 1.0):
        r = svd.rank_for_energy(s, e)
        assert cum[r - 1] >= e - 1e-9
        assert r == 1 or cum[r - 2] < e
    with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
        svd.rank_for_energy(s, 0.0)


def test_break_even_rank():
    for d_in, d_out in ((16, 24), (384, 384), (384, 1536), (1, 1), (7, 3)):
        r = svd.break_even_rank(d_in, d_out)
        assert r * (d_in + d_out) < d_in * d_out or r == 0
        assert (r + 1) * (d_in + d_out) >= d_in * d_out
    assert svd.break_even_rank(384, 384) == 191


def test_weights_from_fisher_and_activations():
    f = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_allclose(svd.fisher_weights(f), np.sqrt(f.sum(0)), rtol=1e-6)
    np.testing.assert_allclose(svd.activation_weights(np.array([4.0, 9.0, 0.0])), [2.0, 3.0, 3e-6], rtol=1e-6)
    with pytest.raises(ValueError, match="all weights are zero"):
        svd.fisher_weights(np.zeros((3, 4)))


# ----------------------------------------------------------------------------- choose_ranks
def test_choose_ranks_respects_the_budget_and_prefers_the_slow_decay():
    shapes = {"fast": (32, 32), "slow": (32, 32), "wide": (32, 96)}
    spectra = {"fast": 0.5 ** np.arange(32), "slow": 0.97 ** np.arange(32), "wide": 0.9 ** np.arange(32)}
    dense = sum(a * b for a, b in shapes.values())
    for budget in (0.2, 0.35, 0.6):
        ranks = svd.choose_ranks(spectra, shapes, budget)
        cost = sum(shapes[s][0] * shapes[s][1] if r is None else r * sum(shapes[s]) for s, r in ranks.items())
        assert cost <= budget * dense
        assert all(r is None or r <= svd.break_even_rank(*shapes[s]) for s, r in ranks.items())
        assert ranks["slow"] is None or (ranks["fast"] is not None and ranks["slow"] > ranks["fast"])
        assert ranks["fast"] is not None  # fast decay: its few first values hold its energy
        # no single rank step that fits the leftover budget was left out
        left = budget * dense - cost
        assert all(r is None or sum(shapes[s]) > left for s, r in ranks.items()
                   if r is not None and r < svd.break_even_rank(*shapes[s]))
    assert all(r is None for r in svd.choose_ranks(spectra, shapes, 1.0).values())
    with pytest.raises(ValueError, match="the smallest budget is"):
        svd.choose_ranks(spectra, shapes, 0.01)


def test_choose_ranks_flops_with_per_site_tokens():
    shapes = {"pooler": (32, 32), "layer": (32, 32)}
    spectra = {k: 0.9 ** np.arange(32) for k in shapes}
    ranks = svd.choose_ranks(spectra, shapes, 0.5, cost="flops", tokens={"pooler": 1, "layer": 128})
    assert ranks["pooler"] is None and ranks["layer"] is not None  # one token: dense is cheap
    same = svd.choose_ranks(spectra, shapes, 0.5, cost="params")
    assert same["pooler"] == same["layer"]


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("bias", [True, False])
def test_low_rank_linear_parameter_count(bias):
    m = lowrank.LowRankLinear(24, 40, 5, use_bias=bias, rngs=nnx.Rngs(0))
    assert count_params(m) == 5 * (24 + 40) + (40 if bias else 0)
    assert (m.in_features, m.out_features, m.rank) == (24, 40, 5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 24\]"):
        lowrank.LowRankLinear(24, 40, 25, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- factorize
@pytest.mark.parametrize("kind", KINDS)
def test_full_rank_factorisation_reproduces_the_logits(tiny, kind):
    model, batch = tiny[kind]
    full_ranks = {s.path: min(F.get_module(model, s.path).kernel.get_value().shape) for s in F.sites(model)}
    full, report = lowrank.factorize(model, ranks=full_ranks, dense_above_break_even=False)
    assert report.ranks == full_ranks
    assert all(isinstance(F.get_module(full, p), lowrank.LowRankLinear) for p in full_ranks)
    assert diff(model, full, batch) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_factorised_model_equals_the_dense_model_with_truncated_kernels(tiny, kind):
    model, batch = tiny[kind]
    small, report = lowrank.factorize(model, rank=3)
    assert len(report.factorised) == len(F.sites(model))  # rank 3 is below every break-even here
    reference = train.copy_model(model)
    for site in F.sites(model):
        lin = F.get_module(reference, site.path)
        a, b = svd.truncated(np.asarray(lin.kernel.get_value()), 3)
        lin.kernel.set_value(jnp.asarray(a @ b))
    assert diff(small, reference, batch) < 1e-5
    assert diff(small, model, batch) > 1e-3
    assert count_params(small) == count_params(model) - report.params_before + report.params_after
    assert len(str(report).splitlines()) <= F.num_layers(model) + 2


def test_energy_target_is_met_with_the_smallest_rank(tiny):
    model, _ = tiny["bert"]
    small, report = lowrank.factorize(model, energy=0.8, dense_above_break_even=False)
    assert len(report.rows) == len(report.factorised) == 12
    for row in report.rows:
        s = np.linalg.svd(np.asarray(F.get_module(model, row.site).kernel.get_value(), np.float64), compute_uv=False)
        cum = np.cumsum(s ** 2) / np.sum(s ** 2)
        assert row.energy >= 0.8 and cum[row.rank - 1] >= 0.8 - 1e-6
        assert row.rank == 1 or cum[row.rank - 2] < 0.8
        assert F.get_module(small, row.site).rank == row.rank


def test_ranks_above_break_even_stay_dense_and_ranks_dict(tiny):
    model, batch = tiny["bert"]
    _, report = lowrank.factorize(model, rank=12)  # 16 x 16 break-even 7, 16 x 24 break-even 9
    assert not report.factorised and all("break-even" in r.reason for r in report.rows)
    assert report.params_after == report.params_before
    q0 = F.site_path(model, 0, "q")
    small, report = lowrank.factorize(model, ranks={q0: 2, F.site_path(model, 1, "q"): None})
    assert report.factorised == [q0] and report.ranks[q0] == 2
    assert {r.reason for r in report.rows if r.rank == "dense"} == {"not in ranks", "ranks gives None"}


def test_uniform_fisher_and_uniform_input_scales_equal_plain_svd(tiny):
    model, batch = tiny["llama"]
    plain, _ = lowrank.factorize(model, rank=3)
    shapes = {s.path: F.get_module(model, s.path).kernel.get_value().shape for s in F.sites(model)}
    fw, _ = lowrank.factorize(model, rank=3, method="fwsvd", fisher={p: np.ones(sh) for p, sh in shapes.items()})
    aw, _ = lowrank.factorize(model, rank=3, method="asvd", input_scales={p: np.full(sh[0], 2.0)
                                                                          for p, sh in shapes.items()})
    assert diff(plain, fw, batch) < 1e-5 and diff(plain, aw, batch) < 1e-5


def bert_loss(model, batch, rngs):
    out = logits_fn(model, batch)
    return optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"]).mean(), None


def logits_fn(model, batch):
    return F.forward(model, batch).logits


def test_fisher_is_the_sum_of_squared_batch_gradients():
    model = tiny_bert(layers=1)
    batches = []
    for seed in (1, 2):
        b = token_batch(2, 8, 50, seed=seed)
        b["labels"] = np.array([0, 2], np.int32)
        batches.append(b)
    site = F.site_path(model, 0, "ffn_in")
    got = lowrank.fisher(model, bert_loss, batches, steps=2, sites=[site])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.jit(jax.grad(lambda p, b: bert_loss(nnx.merge(graphdef, p, rest), b, None)[0]))
    want = 0
    for b in batches:
        g = grad(params, b)
        want = want + np.asarray(F.get_module(nnx.merge(graphdef, g, rest), site).kernel.get_value()) ** 2
    assert list(got) == [site]
    np.testing.assert_allclose(got[site], want, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="batches ran out before step 3"):
        lowrank.fisher(model, bert_loss, batches, steps=3, sites=[site])


def test_input_scales_are_mean_abs_inputs_over_real_tokens(tiny):
    model, _ = tiny["gpt2"]
    calib = lm_batch(3, 9, 61, seed=3)
    scales = lowrank.input_scales(model, calib)
    assert list(scales) == [s.path for s in F.sites(model)]
    out = F.forward(model, calib, capture=("attn_input", "context", "ffn_input", "ffn_intermediate"))
    mask = np.asarray(calib["attention_mask"], bool)
    for site in F.sites(model):
        x = np.asarray(out.intermediates[F.site_input(model, site.role)][site.layer])
        np.testing.assert_allclose(scales[site.path], np.abs(x[mask]).mean(0), rtol=1e-5, atol=1e-7)


def test_data_aware_factorisation_reduces_the_weighted_error(tiny):
    model, _ = tiny["gpt2"]
    calib = lm_batch(4, 9, 61, seed=4)
    scales = lowrank.input_scales(model, calib)
    aw, _ = lowrank.factorize(model, rank=2, method="asvd", input_scales=scales)
    plain, _ = lowrank.factorize(model, rank=2)
    for site in F.sites(model):
        w = np.asarray(F.get_module(model, site.path).kernel.get_value())
        g = svd.activation_weights(scales[site.path])

        def approx(m):
            low = F.get_module(m, site.path)
            return np.asarray(low.down.kernel.get_value()) @ np.asarray(low.up.kernel.get_value())

        assert weighted_err(w, approx(aw), g) <= weighted_err(w, approx(plain), g) * (1 + 1e-5)


def test_spectra_feed_choose_ranks_and_factorize(tiny):
    model, batch = tiny["llama"]
    spectra, shapes = lowrank.spectra(model, roles=("ffn_in", "ffn_gate", "ffn_out"))
    ranks = lowrank.choose_ranks(spectra, shapes, 0.5)
    small, report = lowrank.factorize(model, roles=("ffn_in", "ffn_gate", "ffn_out"), ranks=ranks)
    assert report.ranks == ranks
    assert report.params_after <= 0.5 * report.params_before


def test_errors_name_the_problem(tiny):
    model, _ = tiny["llama"]
    k0 = F.site_path(model, 0, "k")
    with pytest.raises(ValueError, match=rf"{k0}: rank 9 is outside \[1, 8\]"):
        lowrank.factorize(model, rank=9)
    with pytest.raises(RuleError, match="matches no leaf"):
        lowrank.factorize(model, rank=2, rules=[r"no_such_site"])
    with pytest.raises(ValueError, match="exactly one of rank=, energy=, ranks="):
        lowrank.factorize(model, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="needs fisher="):
        lowrank.factorize(model, rank=2, method="fwsvd")
    with pytest.raises(ValueError, match="not selected sites"):
        lowrank.factorize(model, roles=("q",), ranks={k0: 2})
    small, _ = lowrank.factorize(model, rank=2)
    with pytest.raises(ValueError, match="not an nnx.Linear"):
        lowrank.factorize(small, rank=2)


# ----------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_factorised_embedding_at_full_dim_equals_the_model(tiny, kind):
    model, batch = tiny[kind]
    full, info = lowrank.factorize_embedding(model, 16)
    assert isinstance(F.get_module(full, F.word_embedding_path(full)), lowrank.FactorizedEmbed)
    assert info["energy"] == pytest.approx(1.0)
    assert diff(model, full, batch) < 1e-5  # gpt2: the tied LM head goes through attend


def test_factorised_embedding_is_the_product_table_in_lookup_and_tied_head(tiny):
    model, batch = tiny["gpt2"]
    small, info = lowrank.factorize_embedding(model, 5)
    emb = F.get_module(small, F.word_embedding_path(small))
    assert info["params_after"] == 5 * (61 + 16) == count_params(emb)
    reference = train.copy_model(model)
    table = F.get_module(reference, F.word_embedding_path(reference)).embedding
    a, b = svd.truncated(np.asarray(table.get_value()), 5)
    table.set_value(jnp.asarray(a @ b))
    assert diff(small, reference, batch) < 1e-5


def test_factorised_embedding_errors(tiny):
    model, _ = tiny["bert"]
    with pytest.raises(ValueError, match=r"dim must be an int in \[1, 16\]"):
        lowrank.factorize_embedding(model, 17)
    from efficient_nlp import models
    mlm = models.BertForMaskedLM(model.config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reads the word-embedding table directly"):
        lowrank.factorize_embedding(mlm, 4)


# ----------------------------------------------------------------------------- save / load, composition
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_round_trip(tiny, kind, tmp_path):
    model, batch = tiny[kind]
    small, _ = lowrank.factorize(model, rank=3, roles=("q", "v", "ffn_in"))
    small, _ = lowrank.factorize_embedding(small, 6)
    lowrank.save(small, tmp_path)
    again = lowrank.load(tmp_path)
    assert lowrank.layout(again) == lowrank.layout(small)
    np.testing.assert_array_equal(np.asarray(logits(again, batch)), np.asarray(logits(small, batch)))


def test_load_refuses_a_dense_checkpoint_and_save_refuses_a_quantized_model(tiny, tmp_path):
    from efficient_nlp import models
    model, _ = tiny["bert"]
    models.save_hf_checkpoint(model, tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="not a factorised model; load it with models.from_pretrained"):
        lowrank.load(tmp_path / "dense")
    small, _ = lowrank.factorize(model, rank=3)
    qmodel, _ = quant.quantize_model(small, quant.make_spec(8, 8, 32))
    with pytest.raises(ValueError, match="quantize or wrap after loading"):
        lowrank.save(qmodel, tmp_path / "q")


def test_quantization_composes_with_factorisation(tiny):
    model, batch = tiny["bert"]
    small, report = lowrank.factorize(model, rank=3)
    qmodel, qreport = quant.quantize_model(small, quant.make_spec(4, 8, 32))
    for site in report.factorised:
        for part in ("down", "up"):
            assert isinstance(F.get_module(qmodel, f"{site}.{part}"), quant.modules.QuantLinear)
            assert f"{site}.{part}" in qreport.quantized
    d = diff(qmodel, small, batch)
    assert 1e-6 < d < 0.5


def test_load_a_factorised_encoder_with_a_fresh_classifier(tiny, tmp_path):
    from efficient_nlp import models
    model, batch = tiny["bert"]
    bare = models.BertModel(model.config, rngs=nnx.Rngs(1))
    small, _ = lowrank.factorize(bare, rank=3)
    lowrank.save(small, tmp_path)
    clf = lowrank.load(tmp_path, num_labels=4)
    assert isinstance(clf, models.BertForSequenceClassification) and clf.config.num_labels == 4
    assert lowrank.layout(clf) == lowrank.layout(small)
    np.testing.assert_array_equal(np.asarray(F.forward(clf, batch).last_hidden_state),
                                  np.asarray(F.forward(small, batch).last_hidden_state))


def test_the_first_factor_of_an_ffn_out_site_keeps_its_unsigned_input():
    """The input of ``ffn_out``'s ``down`` factor is the GELU output, as the dense site's was;
    ``up`` reads the thin intermediate (signed)."""
    model, _ = lowrank.factorize(tiny_bert(), rank=2)
    _, sites = quant.find_sites(model)
    ffn_out = F.site_path(model, 0, "ffn_out")
    assert sites[f"{ffn_out}.down.input"] == "activation_unsigned"
    assert sites[f"{ffn_out}.up.input"] == "activation"


def test_saving_a_factorised_model_with_lora_says_what_to_do(tmp_path):
    from efficient_nlp import peft
    model, _ = lowrank.factorize(tiny_bert(), rank=2)
    lora, _ = peft.add_lora(model)
    with pytest.raises(ValueError, match="save_adapter|merge"):
        lowrank.save(lora, tmp_path / "out")
