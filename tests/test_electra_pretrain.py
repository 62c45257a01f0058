"""ELECTRA pre-training (Clark et al. 2020): replaced-token labels, Gumbel-max sampling, the
generator's shape, embeddings shared through training and checkpoints, the loss recomputed by
hand, a short run that teaches the discriminator more than the label prior, and the
discriminator's HF checkpoint (parity with transformers, fine-tuning as a classifier)."""
import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp import models as M
from efficient_nlp import train
from efficient_nlp.models.hf_checkpoint import read_safetensors
from efficient_nlp.pretrain import electra as E
from efficient_nlp.pretrain.mlm import mask_tokens

V, PAD, CLS, SEP, MASK = 64, 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
KW = dict(vocab_size=V, mask_id=MASK, special_ids=SPECIAL)


def disc_config(**kw):
    return M.BertConfig(**{**dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, model_type="electra",
                                  embedding_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                          **kw})


def progressions(n, length=16, seed=0):
    """[CLS] a, a+b, a+2b, ... (mod 16, ids 10..25) [SEP]: a corpus whose tokens a replacement
    from a barely trained generator (nearly uniform over 64 ids) seldom fits."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 16, n), rng.integers(1, 4, n)
    body = (a[:, None] + b[:, None] * np.arange(length - 2)) % 16 + 10
    return np.concatenate([np.full((n, 1), CLS), body, np.full((n, 1), SEP)], 1).astype(np.int32)


def batches(blocks, batch_size=16, seed=1):
    rng = np.random.default_rng(seed)
    while True:
        ids = blocks[rng.integers(0, len(blocks), batch_size)]
        yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def params_np(model):
    return {k: np.asarray(v.get_value()) for k, v in M.named_params(model).items()}


def shared_pairs(pre):
    gen, disc = pre.generator.electra.embeddings, pre.discriminator.electra.embeddings
    return [(getattr(gen, n), getattr(disc, n)) for n in E.SHARED_EMBEDDINGS]


def binary_entropy(p):
    return float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


# ----------------------------------------------------------------------------- pure pieces
def test_replaced_labels_mark_exactly_the_changed_selected_positions():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 5, (6, 40))
    sampled = np.where(rng.random((6, 40)) < 0.5, original, rng.integers(0, 5, (6, 40)))
    selected = rng.random((6, 40)) < 0.3
    labels = np.asarray(E.replaced_labels(original, sampled, selected))
    assert labels.dtype == bool
    assert not labels[~selected].any()                                   # nothing outside the selection
    np.testing.assert_array_equal(labels[selected], (sampled != original)[selected])
    # both cases occur, so the assertions above are not vacuous
    assert labels.any() and (selected & (sampled == original)).any()


def test_gumbel_max_samples_follow_the_softmax():
    logits = jnp.log(jnp.asarray([0.5, 0.25, 0.15, 0.07, 0.03]))
    n = 40_000
    draws = np.asarray(E.gumbel_max_sample(jax.random.key(0), jnp.broadcast_to(logits, (n, 5))))
    freq = np.bincount(draws, minlength=5) / n
    p = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / n).max())
    # temperature matters: sharper logits give a sharper sample distribution
    sharp = np.asarray(E.gumbel_max_sample(jax.random.key(1), jnp.broadcast_to(4 * logits, (n, 5))))
    assert np.mean(sharp == 0) > freq[0] + 0.3


def test_replaced_token_loss_is_bce_over_real_tokens():
    z = np.array([[2.0, -1.0, 0.5, 3.0], [-0.2, 1.5, -4.0, 9.0]], np.float32)
    y = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)
    m = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    loss, acc = E.replaced_token_loss(z, y, m)
    per = np.where(y, np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
    assert float(loss) == pytest.approx(per[m > 0].mean(), rel=1e-6)
    assert float(acc) == pytest.approx(((z > 0) == y)[m > 0].mean())


def test_generator_config_scales_width_and_keeps_embeddings():
    d = disc_config(hidden_size=64, num_attention_heads=4, intermediate_size=256, embedding_size=32)
    g = E.generator_config(d, 0.25)
    assert (g.hidden_size, g.num_attention_heads, g.intermediate_size) == (16, 1, 64)
    assert g.num_hidden_layers == d.num_hidden_layers and g.model_type == "electra"
    assert g.embedding_width == 32 and g.vocab_size == d.vocab_size
    assert E.generator_config(d, 0.5).attention_head_dim == d.attention_head_dim
    two_heads = disc_config(hidden_size=64, num_attention_heads=2, intermediate_size=256)
    assert E.generator_config(two_heads, 0.25).num_attention_heads == 1   # at least one head
    with pytest.raises(ValueError, match="hidden_size=0"):
        E.generator_config(disc_config(hidden_size=2, num_attention_heads=1, intermediate_size=8), 0.1)
    with pytest.raises(ValueError, match="not divisible"):
        E.generator_config(disc_config(hidden_size=40, num_attention_heads=4), 0.7)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        E.generator_config(d, 1.5)
    with pytest.raises(ValueError, match="model_type='electra'"):
        E.generator_config(d.replace(model_type="bert", embedding_size=None))
    with pytest.raises(ValueError, match="embedding_width"):
        E.ElectraPretrainer(d, rngs=nnx.Rngs(0), generator_config=g.replace(embedding_size=16))


# ----------------------------------------------------------------------------- the pretrainer
def test_embeddings_shared_and_projections_own():
    pre = E.ElectraPretrainer(disc_config(), rngs=nnx.Rngs(0))
    for g, d in shared_pairs(pre):
        assert g is d
    gen, disc = pre.generator.electra.embeddings, pre.discriminator.electra.embeddings
    assert gen.project.kernel.get_value().shape == (16, 8) and disc.project.kernel.get_value().shape == (16, 32)
    # one copy in the state: the generator's subtree holds only its own projection
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(pre, nnx.Param))]
    assert [p for p in paths if p.startswith("generator/electra/embeddings")] == [
        "generator/electra/embeddings/project/bias", "generator/electra/embeddings/project/kernel"]
    merged = nnx.merge(*nnx.split(pre))
    for g, d in shared_pairs(merged):
        assert g is d
    # an existing pair (e.g. grown or loaded models) is wrapped with the discriminator's tables
    gen = M.BertForMaskedLM(E.generator_config(disc_config()), rngs=nnx.Rngs(5))
    disc = M.ElectraForPreTraining(disc_config(), rngs=nnx.Rngs(6))
    table = np.asarray(disc.electra.embeddings.word_embeddings.embedding.get_value())
    assert not np.array_equal(table, gen.electra.embeddings.word_embeddings.embedding.get_value())
    wrapped = E.ElectraPretrainer(models=(gen, disc))
    assert wrapped.generator is gen and wrapped.discriminator is disc
    for g, d in shared_pairs(wrapped):
        assert g is d
    np.testing.assert_array_equal(gen.electra.embeddings.word_embeddings.embedding.get_value(), table)
    with pytest.raises(TypeError, match="generator: BertForMaskedLM"):
        E.ElectraPretrainer(models=(disc, gen))


def test_loss_is_mlm_plus_50_disc_recomputed_by_hand():
    pre = E.ElectraPretrainer(disc_config(), rngs=nnx.Rngs(3))
    ids = progressions(4, seed=2)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    ids[1, 10:] = PAD
    batch = {"input_ids": ids, "attention_mask": mask}
    key = jax.random.key(7)
    loss, aux = E.electra_loss_fn(**KW, rate=0.3)(pre, batch, nnx.Rngs(dropout=key))

    mask_key, sample_key = jax.random.split(nnx.Rngs(dropout=key).dropout())
    corrupted, selected = mask_tokens(mask_key, ids, **KW, attention_mask=mask, rate=0.3, mask_prob=0.85,
                                      random_prob=0.0)
    selected = np.asarray(selected)
    gl = np.asarray(pre.generator(corrupted, mask).logits, np.float64)
    logp = gl - np.log(np.exp(gl).sum(-1, keepdims=True))
    mlm = -np.take_along_axis(logp, ids[..., None], -1)[..., 0][selected].mean()
    sampled = np.argmax(gl + np.asarray(jax.random.gumbel(sample_key, gl.shape)), -1)
    labels = selected & (sampled != ids)
    z = np.asarray(pre.discriminator(np.where(selected, sampled, ids), mask).logits, np.float64)
    bce = np.where(labels, np.log1p(np.exp(-z)), np.log1p(np.exp(z)))[mask > 0].mean()  # [CLS]/[SEP] included
    assert labels.sum() > 0 and not selected[mask == 0].any()
    assert float(aux["mlm_loss"]) == pytest.approx(mlm, rel=1e-5)
    assert float(aux["disc_loss"]) == pytest.approx(bce, rel=1e-5)
    assert float(loss) == pytest.approx(mlm + 50.0 * bce, rel=1e-5)
    assert float(aux["replaced_fraction"]) == pytest.approx(labels.sum() / mask.sum())
    assert float(aux["disc_accuracy"]) == pytest.approx(((z > 0) == labels)[mask > 0].mean())


def test_generator_learns_only_from_mlm():
    """The sample is a stop-gradient: the discriminator's loss reaches the generator only
    through the shared embeddings, never its own layers, projection or MLM head."""
    pre = E.ElectraPretrainer(disc_config(), rngs=nnx.Rngs(0))
    ids = progressions(4)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    loss_fn = E.electra_loss_fn(**KW, rate=0.3)

    grads = nnx.grad(lambda m: loss_fn(m, batch, nnx.Rngs(dropout=jax.random.key(0)))[1]["disc_loss"])(pre)
    disc = {"/".join(map(str, p)): float(np.abs(np.asarray(v.get_value())).max())
            for p, v in nnx.to_flat_state(grads)}
    gen = [p for p in disc if p.startswith("generator/")]
    assert len(gen) > 10 and max(disc[p] for p in gen) == 0.0
    assert disc["discriminator/electra/embeddings/word_embeddings/embedding"] > 0.0
    assert min(disc[p] for p in disc if p.startswith("discriminator/electra/encoder/") and "kernel" in p) > 0.0


# ----------------------------------------------------------------------------- training
OPTIMIZER = optax.adam(3e-3)
STEPS = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pretrainer trained by `train.fit` for 30 steps on the progression corpus (one
    checkpoint, at the end), its held-out evaluations before and after (fixed masking and
    sampling), the evaluation function and the workdir."""
    import ml_collections

    workdir = tmp_path_factory.mktemp("electra") / "run"
    config = ml_collections.ConfigDict(dict(train=dict(
        num_steps=STEPS, checkpoint_every=STEPS, log_every=1, seed=0, tensorboard=False, progress_bar=False,
        async_checkpointing=False)))
    blocks = progressions(512)
    model = E.ElectraPretrainer(disc_config(), rngs=nnx.Rngs(0))
    evaluate = E.electra_eval_fn(progressions(60, seed=5), 32, **KW, rate=0.25)
    before = evaluate(model)
    out, history = train.fit(model, E.electra_loss_fn(**KW, rate=0.25), lambda s: batches(blocks, seed=s),
                             config=config, workdir=str(workdir), eval_fn=evaluate, optimizer=OPTIMIZER)
    return dict(model=out, history=history, before=before, after=evaluate(out), evaluate=evaluate,
                start=model, workdir=workdir)


def test_discriminator_learns_more_than_the_label_prior(trained):
    history, before, after = trained["history"], trained["before"], trained["after"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == STEPS and all(np.isfinite(h["loss"]) for h in steps)
    assert {h["step"]: h for h in history if "eval/disc_loss" in h}[STEPS]["eval/disc_loss"] == after["disc_loss"]
    prior = after["replaced_fraction"]
    assert 0.1 < prior < 0.3
    # a discriminator that only knew how often tokens are replaced would score H(prior) and 1 - prior
    assert after["disc_loss"] < binary_entropy(prior) - 0.05
    assert after["disc_accuracy"] > 1 - prior + 0.03
    assert after["mlm_loss"] < before["mlm_loss"] - 0.5
    assert trained["evaluate"](trained["model"]) == after          # fixed keys: the same every call


def test_shared_embeddings_survive_fit_and_its_checkpoint(trained, tmp_path):
    model, start = trained["model"], trained["start"]
    for g, d in shared_pairs(model):
        assert g is d
    word = "electra.embeddings.word_embeddings.embedding"
    after = params_np(model.discriminator)
    assert not np.allclose(after[word], params_np(start.discriminator)[word])    # trained ...
    np.testing.assert_array_equal(params_np(model.generator)[word], after[word])  # ... as one table
    # the orbax checkpoint fit wrote restores into a fresh pretrainer, still sharing one set
    graphdef, template = train.init_state(E.ElectraPretrainer(disc_config(), rngs=nnx.Rngs(1)), OPTIMIZER)
    state = train.Checkpointer(trained["workdir"] / "checkpoints").restore(STEPS, template)
    restored = nnx.merge(graphdef, state.params, state.rest)
    assert int(state.step) == STEPS
    for g, d in shared_pairs(restored):
        assert g is d
    want, got = params_np(model), params_np(restored)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # each part saves as a HF directory holding the same tables, and its own projection
    gen = read_safetensors(M.save_hf_checkpoint(restored.generator, tmp_path / "gen"))
    disc = read_safetensors(M.save_hf_checkpoint(E.discriminator_of(restored), tmp_path / "disc"))
    for name in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
                 "LayerNorm.weight", "LayerNorm.bias"):
        np.testing.assert_array_equal(gen["electra.embeddings." + name], disc["electra.embeddings." + name])
    assert gen["electra.embeddings_project.weight"].shape == (8, 16)
    assert disc["electra.embeddings_project.weight"].shape == (32, 16)


def test_eval_is_fixed_by_its_seed_and_ignores_fill_rows(trained):
    model, held = trained["model"], progressions(60, seed=5)
    a = E.electra_eval_fn(held, 32, **KW, rate=0.25, seed=1)(model)
    assert set(a) == {"mlm_loss", "mlm_accuracy", "disc_loss", "disc_accuracy", "replaced_fraction"}
    assert a != E.electra_eval_fn(held, 32, **KW, rate=0.25, seed=2)(model)
    # 60 rows in batches of 32: the 4 rows filling the last batch (attention mask 0) count
    # nowhere, whatever token they hold (a non-special one would be selected were they real)
    assert a == E.electra_eval_fn(held, 32, **KW, rate=0.25, seed=1, pad_id=17)(model)


def test_discriminator_checkpoint_finetunes_as_a_classifier(trained, tmp_path):
    disc = E.discriminator_of(trained["model"])
    M.save_hf_checkpoint(disc, tmp_path)
    clf = M.from_pretrained(tmp_path, num_labels=2)
    assert type(clf) is M.BertForSequenceClassification and clf.config.num_labels == 2
    ours, theirs = params_np(disc), params_np(clf)
    backbone = [k for k in ours if k.startswith("electra.")]
    assert len(backbone) == len([k for k in theirs if k.startswith("electra.")]) > 20
    for k in backbone:
        np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
    assert set(theirs) - set(ours) == {"pre_classifier.kernel", "pre_classifier.bias", "classifier.kernel",
                                       "classifier.bias"}
    back = M.from_pretrained(tmp_path, head="discriminator")
    ids = progressions(3, seed=9)
    np.testing.assert_array_equal(back(ids).logits, disc(ids).logits)
    M.save_hf_checkpoint(M.BertModel(disc_config(model_type="bert", embedding_size=None), rngs=nnx.Rngs(0)),
                         tmp_path / "bert")
    with pytest.raises(ValueError, match="head='discriminator'.*ELECTRA"):
        M.from_pretrained(tmp_path / "bert", head="discriminator")
    with pytest.raises(TypeError, match="ElectraPretrainer"):
        E.discriminator_of(clf)


# ----------------------------------------------------------------------------- parity
def test_parity_with_transformers_electra_for_pretraining(tmp_path):
    torch = pytest.importorskip("torch", reason="parity with transformers needs torch")
    transformers = pytest.importorskip("transformers")
    cfg = disc_config(embedding_size=8, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    ours = M.ElectraForPreTraining(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(ours, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(ours, jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), params))
    M.save_hf_checkpoint(ours, tmp_path / "ours")

    rng = np.random.default_rng(0)
    ids = rng.integers(4, V, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1

    def torch_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         token_type_ids=torch.tensor(types)).logits.numpy()

    theirs = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.embedding_size == 8 and theirs.config.architectures == ["ElectraForPreTraining"]
    np.testing.assert_allclose(torch_logits(theirs), np.asarray(ours(ids, mask, types).logits), atol=1e-5)

    # and the other direction: a transformers checkpoint loads as ours
    torch.manual_seed(0)
    hf = transformers.ElectraForPreTraining(transformers.ElectraConfig(
        vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = M.from_pretrained(tmp_path / "hf", head="discriminator")
    assert type(loaded) is M.ElectraForPreTraining
    np.testing.assert_allclose(np.asarray(loaded(ids, mask, types).logits), torch_logits(hf), atol=1e-5)
