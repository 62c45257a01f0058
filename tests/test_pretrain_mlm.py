"""Masked-LM pre-training pieces: WordPiece tokenizer, encoder blocks, BERT masking, loss,
training, held-out evaluation and exact resume (efficient_nlp.pretrain.data / .mlm)."""
import contextlib
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import models, train
from efficient_nlp.data import lm
from efficient_nlp.data.corpus import builtin_corpus
from efficient_nlp.data.pipeline import load_tokenizer, tokenize
from efficient_nlp.pretrain.data import SPECIAL_TOKENS, encoder_blocks, special_ids, train_wordpiece_tokenizer
from efficient_nlp.pretrain.mlm import mask_tokens, mlm_eval_fn, mlm_loss, mlm_loss_fn

VOCAB = 256
BLOCK = 32


@pytest.fixture(scope="module")
def texts():
    return builtin_corpus("train")[:200]


@pytest.fixture(scope="module")
def tok(texts):
    return train_wordpiece_tokenizer(texts, VOCAB)


@pytest.fixture(scope="module")
def settings(tok):
    return dict(vocab_size=len(tok), mask_id=tok.mask_token_id, special_ids=special_ids(tok))


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocabulary_special_ids_and_determinism(tok, texts):
    assert len(tok) == VOCAB
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert special_ids(tok) == (0, 1, 2, 3, 4)
    pieces = tok.tokenize("Hello World")
    assert pieces[0] == "h" or pieces[0].startswith("he")  # lowercased
    assert "".join(p[2:] if p.startswith("##") else " " + p for p in pieces).strip() == "hello world"
    # Same texts, same vocabulary and ids (the library alone breaks ties differently per run).
    again = train_wordpiece_tokenizer(texts, VOCAB)
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_round_trip_through_the_data_pipeline(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.get_vocab() == tok.get_vocab()
    for text in builtin_corpus("validation")[:100]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    # Sentence pairs as the fine-tuning data path builds them.
    out = tokenize(loaded, ["the first sentence"], ["and a second"], max_length=24)
    ids, types, mask = out["input_ids"][0], out["token_type_ids"][0], out["attention_mask"][0]
    a = tok("the first sentence", add_special_tokens=False)["input_ids"]
    b = tok("and a second", add_special_tokens=False)["input_ids"]
    real = [2, *a, 3, *b, 3]
    np.testing.assert_array_equal(ids[: len(real)], real)
    assert (ids[len(real):] == 0).all() and mask.sum() == len(real)
    np.testing.assert_array_equal(types[: len(real)], [0] * (len(a) + 2) + [1] * (len(b) + 1))


def test_tokenizer_keeps_case_when_asked(texts, tmp_path):
    cased = train_wordpiece_tokenizer(texts[:60], 300, str(tmp_path), lowercase=False)
    assert cased.tokenize("The")[0].startswith("T")
    assert load_tokenizer(str(tmp_path)).tokenize("The") == cased.tokenize("The")


def test_tokenizer_errors(texts):
    with pytest.raises(ValueError, match=r"vocab_size >= \d+"):
        train_wordpiece_tokenizer(texts[:20], 40)
    with pytest.raises(ValueError, match="special tokens"):
        train_wordpiece_tokenizer(texts[:20], 5)
    with pytest.raises(ValueError, match="non-empty"):
        train_wordpiece_tokenizer([], 100)
    with pytest.raises(TypeError, match="not a single str"):
        train_wordpiece_tokenizer("some text", 100)
    with pytest.raises(ValueError, match="no words"):
        train_wordpiece_tokenizer(["  ", "\n"], 100)


# ----------------------------------------------------------------------------- blocks
def test_encoder_blocks_structure(tok, texts):
    docs = texts[:40]
    blocks = encoder_blocks(tok, docs, 16)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 16
    assert (blocks[:, 0] == tok.cls_token_id).all() and (blocks[:, -1] == tok.sep_token_id).all()
    # The inner columns are the documents joined by [SEP] (none after the last), ragged tail dropped.
    stream = []
    for i, doc in enumerate(docs):
        stream += ([tok.sep_token_id] if i else []) + tok(doc, add_special_tokens=False)["input_ids"]
    assert len(blocks) == len(stream) // 14
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), stream[: len(blocks) * 14])
    inner = blocks[:, 1:-1]
    assert not np.isin(inner, [tok.cls_token_id, tok.pad_token_id, tok.mask_token_id]).any()
    assert (inner == tok.sep_token_id).any()  # documents end inside blocks
    with pytest.raises(ValueError, match="smaller block_size"):
        encoder_blocks(tok, ["one short text"], 64)
    with pytest.raises(ValueError, match="block_size must be >= 3"):
        encoder_blocks(tok, docs, 2)
    # Batches come from the causal-LM batcher: input_ids and an all-ones attention mask.
    batch = next(lm.lm_batches(blocks, 4, seed=0))
    assert batch["input_ids"].shape == (4, 16) and (batch["attention_mask"] == 1).all()


# ----------------------------------------------------------------------------- masking
SPECIAL = (0, 1, 2, 3, 4)


def _masking_data(vocab, shape=(256, 512), seed=0):
    """Random ids in [5, vocab), [CLS] first, [SEP] last, some [UNK], the last fifth padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, shape).astype(np.int32)
    pad = shape[1] // 5
    ids[:, 0], ids[:, -pad - 1] = 2, 3
    ids[::7, 5] = 1
    mask = np.ones(shape, np.int32)
    mask[:, -pad:] = 0
    ids[:, -pad:] = 0
    return ids, mask


def _within(count, n, p, sigmas=4.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_statistics_and_eligibility():
    vocab = 100
    ids, mask = _masking_data(vocab)
    fn = jax.jit(lambda key, x, m: mask_tokens(key, x, vocab_size=vocab, mask_id=4, special_ids=SPECIAL,
                                               attention_mask=m))
    corrupted, selected = (np.asarray(a) for a in fn(jax.random.key(3), ids, mask))
    assert corrupted.dtype == np.int32 and selected.dtype == bool and corrupted.shape == ids.shape
    eligible = (mask == 1) & ~np.isin(ids, SPECIAL)
    assert not selected[~eligible].any()  # special tokens and padding never selected
    np.testing.assert_array_equal(corrupted[~selected], ids[~selected])  # nothing else changes
    n = int(eligible.sum())
    assert _within(int(selected.sum()), n, 0.15)
    k = int(selected.sum())
    became_mask = corrupted[selected] == 4
    changed = (corrupted[selected] != 4) & (corrupted[selected] != ids[selected])
    kept = corrupted[selected] == ids[selected]
    hit = 1.0 / (vocab - len(SPECIAL))  # a random draw equal to the original token
    assert _within(int(became_mask.sum()), k, 0.8)
    assert _within(int(changed.sum()), k, 0.1 * (1 - hit))
    assert _within(int(kept.sum()), k, 0.1 + 0.1 * hit)
    # Random replacements are never special ids: the only special id introduced is [MASK].
    introduced = corrupted[selected & (corrupted != ids)]
    assert not np.isin(introduced[introduced != 4], SPECIAL).any()


def test_random_replacements_are_uniform_over_non_special_ids():
    vocab, special = 20, (0, 2, 3, 7, 19)
    ids = np.full((400, 100), 5, np.int32)
    corrupted, selected = mask_tokens(jax.random.key(0), ids, vocab_size=vocab, mask_id=3, special_ids=special,
                                      rate=1.0, mask_prob=0.0, random_prob=1.0)
    assert np.asarray(selected).all()
    counts = np.bincount(np.asarray(corrupted).reshape(-1), minlength=vocab)
    allowed = [i for i in range(vocab) if i not in special]
    assert counts[list(special)].sum() == 0
    expected = ids.size / len(allowed)
    chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
    dof = len(allowed) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), chi2


def test_mask_tokens_deterministic_per_key():
    ids, mask = _masking_data(100, shape=(8, 128))
    kw = dict(vocab_size=100, mask_id=4, special_ids=SPECIAL, attention_mask=mask)
    a = mask_tokens(jax.random.key(1), ids, **kw)
    b = jax.jit(lambda key: mask_tokens(key, ids, **kw))(jax.random.key(1))
    c = mask_tokens(jax.random.key(2), ids, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])


def test_mask_tokens_errors():
    ids = np.full((2, 8), 5, np.int32)
    with pytest.raises(ValueError, match="mask_prob \\+ random_prob"):
        mask_tokens(jax.random.key(0), ids, vocab_size=10, mask_id=4, special_ids=SPECIAL, mask_prob=0.9,
                    random_prob=0.2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mask_tokens(jax.random.key(0), ids, vocab_size=10, mask_id=12, special_ids=SPECIAL)
    with pytest.raises(ValueError, match="rate"):
        mask_tokens(jax.random.key(0), ids, vocab_size=10, mask_id=4, special_ids=SPECIAL, rate=1.5)


# ----------------------------------------------------------------------------- loss
def test_mlm_loss_matches_numpy_and_is_zero_without_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, (2, 5)).astype(np.int32)
    selected = np.zeros((2, 5), bool)
    selected[0, 1] = selected[0, 4] = selected[1, 2] = True
    ids[0, 1] = int(np.argmax(logits[0, 1]))  # one sure hit
    ids[1, 2] = int(np.argmin(logits[1, 2]))  # one sure miss
    loss, accuracy = mlm_loss(logits, ids, selected)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = [-logp[b, t, ids[b, t]] for b, t in zip(*np.nonzero(selected))]
    hits = [np.argmax(logits[b, t]) == ids[b, t] for b, t in zip(*np.nonzero(selected))]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-6)
    assert float(accuracy) == pytest.approx(np.mean(hits)) and 0 < np.mean(hits) < 1

    none = np.zeros_like(selected)
    loss0, acc0 = mlm_loss(logits, ids, none)
    assert float(loss0) == 0.0 and float(acc0) == 0.0
    grad = jax.grad(lambda z: mlm_loss(z, ids, none)[0])(jnp.asarray(logits))
    assert np.all(np.asarray(grad) == 0.0)  # finite, no NaN from 0 / 0


# ----------------------------------------------------------------------------- training
class _Recorder:
    """A stand-in masked LM that records what the loss function feeds it; its logits put
    log-probability 0 on the input token, so the loss depends on the corruption only."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = []

    def __call__(self, ids, attention_mask, *, deterministic=True, rngs=None):
        self.calls.append((np.asarray(ids), np.asarray(attention_mask), deterministic, rngs))
        return SimpleNamespace(logits=100.0 * jax.nn.one_hot(ids, self.vocab))


def test_loss_fn_masks_with_the_first_draw_of_rngs(settings, blocks):
    ids = blocks[0][:4]
    mask = np.ones_like(ids)
    mask[1, -5:] = 0
    model = _Recorder(settings["vocab_size"])
    loss_fn = mlm_loss_fn(**settings)
    loss, aux = loss_fn(model, {"input_ids": ids, "attention_mask": mask}, nnx.Rngs(dropout=jax.random.key(5)))
    fed, fed_mask, deterministic, rngs = model.calls[-1]
    expected, selected = mask_tokens(nnx.Rngs(dropout=jax.random.key(5)).dropout(), ids, attention_mask=mask,
                                     **settings)
    np.testing.assert_array_equal(fed, expected)  # the masks come from the rngs' first draw
    np.testing.assert_array_equal(fed_mask, mask)
    assert deterministic is False and rngs is not None  # training mode, dropout from the same rngs
    # The stand-in predicts the corrupted token: right exactly where a selected token was kept.
    selected = np.asarray(selected)
    kept = np.asarray(expected)[selected] == ids[selected]
    assert float(aux["mlm_accuracy"]) == pytest.approx(kept.mean())
    assert float(loss) == pytest.approx(100.0 * (1 - kept.mean()), rel=1e-5)
    loss_fn(model, {"input_ids": ids, "attention_mask": mask}, nnx.Rngs(dropout=jax.random.key(6)))
    assert not np.array_equal(model.calls[-1][0], fed)  # another step key, other masks


def _model(vocab, seed=0):
    cfg = models.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=BLOCK)
    return models.BertForMaskedLM(cfg, rngs=nnx.Rngs(seed))  # dropout 0.1: training uses the rngs


@pytest.fixture(scope="module")
def blocks(tok, texts):
    return encoder_blocks(tok, texts, BLOCK), encoder_blocks(tok, builtin_corpus("validation")[:40], BLOCK)


STEPS = 30


@pytest.fixture(scope="module")
def runs(tok, settings, blocks, tmp_path_factory):
    """Masked-LM pre-training of a tiny BERT for STEPS updates: in one go, and as a run to
    STEPS // 2 continued to STEPS in the same workdir. A constant learning rate (an explicit
    optimizer) makes the two schedules the same. Returns (initial model, eval_fn, straight
    (model, history), resumed (model, history))."""
    train_blocks, val_blocks = blocks
    loss_fn = mlm_loss_fn(**settings)
    evaluate = mlm_eval_fn(val_blocks, 16, **settings)
    optimizer = optax.adamw(1e-2)

    def batches(start):
        return lm.lm_batches(train_blocks, 16, seed=0, start_step=start)

    def fit(workdir, steps, eval_fn=None):
        config = ml_collections.ConfigDict()
        config.train = train.default_train_config()
        config.train.update(dict(num_steps=steps, batch_size=16, log_every=1, checkpoint_every=0, eval_every=0,
                                 tensorboard=False, progress_bar=False, progress_seconds=0.0))
        return train.fit(_model(len(tok)), loss_fn, batches, config=config, workdir=str(workdir),
                         optimizer=optimizer, eval_fn=eval_fn)

    base = tmp_path_factory.mktemp("mlm_runs")
    with _compiled_once(base / "xla_cache"):
        straight = fit(base / "straight", STEPS, evaluate)
        fit(base / "resumed", STEPS // 2)
        resumed = fit(base / "resumed", STEPS, evaluate)
    return _model(len(tok)), evaluate, straight, resumed


@contextlib.contextmanager
def _compiled_once(cache_dir):
    """A persistent compilation cache in ``cache_dir`` while the block runs (settings restored
    after): every ``fit`` jits its own step, and the runs share one program, so the second and
    third load it instead of compiling it again (the slowest part of this module)."""
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(cache_dir), "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _eval_record(history):
    return {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}


def test_mlm_training_lowers_held_out_loss(tok, settings, blocks, runs):
    initial, evaluate, (trained, history), _ = runs
    before = evaluate(initial)
    assert before == evaluate(initial)  # fixed masking: the same numbers every call
    other_batching = mlm_eval_fn(blocks[1], 7, **settings)(initial)  # masks do not depend on the batch size
    for key in before:
        assert other_batching[key] == pytest.approx(before[key], rel=1e-5)
    assert before["mlm_perplexity"] == pytest.approx(math.exp(before["mlm_loss"]))
    assert abs(before["mlm_loss"] - math.log(len(tok))) < 0.5  # near-uniform predictions at init

    after = _eval_record(history)
    assert after == pytest.approx(evaluate(trained))
    # ~1000 scored tokens; 30 steps reach about the unigram cross-entropy (5.05 nats) from ln(256).
    assert after["mlm_loss"] < before["mlm_loss"] - 0.3, (before, after)
    assert after["mlm_accuracy"] > before["mlm_accuracy"] + 0.015, (before, after)
    records = [h for h in history if "loss" in h]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(0.0 <= r["mlm_accuracy"] <= 1.0 for r in records)


def test_mlm_pretraining_resumes_exactly(runs):
    initial, _, (straight, straight_history), (resumed, history) = runs
    assert [h["step"] for h in history if "loss" in h] == list(range(STEPS // 2 + 1, STEPS + 1))
    a = jax.tree.leaves(nnx.to_pure_dict(nnx.state(straight, nnx.Param)))
    b = jax.tree.leaves(nnx.to_pure_dict(nnx.state(resumed, nnx.Param)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = {h["step"]: h["loss"] for h in straight_history if "loss" in h}
    assert all(h["loss"] == losses[h["step"]] for h in history if "loss" in h)
    assert _eval_record(history) == _eval_record(straight_history)
    fresh = jax.tree.leaves(nnx.to_pure_dict(nnx.state(initial, nnx.Param)))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, fresh))
