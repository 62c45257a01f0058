"""The causal-LM recipe: the loss against a numpy reference, pre-training a tiny decoder from
scratch on the built-in corpus, reloading it, fine-tuning it on local text files, resuming."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from efficient_nlp import data, models, train
from efficient_nlp.data import lm
from efficient_nlp.recipes import causal_lm, run_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root


# ----------------------------------------------------------------------------- loss
def test_causal_lm_loss_matches_numpy_reference_with_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 7)).astype(np.float32) * 3
    ids = rng.integers(0, 7, size=(3, 6)).astype(np.int32)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], np.int32)
    nll, hits, count = 0.0, 0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t] and mask[b, t + 1]:
                z = logits[b, t].astype(np.float64)
                logp = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
                nll -= logp[ids[b, t + 1]]
                hits += int(np.argmax(z) == ids[b, t + 1])
                count += 1
    assert count == 5 + 3 + 4
    loss, aux = causal_lm.causal_lm_loss(logits, ids, mask)
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
    assert float(aux["token_accuracy"]) == pytest.approx(hits / count)
    # No mask = every target counts; padding changes the result.
    full, _ = causal_lm.causal_lm_loss(logits, ids)
    want = causal_lm.causal_lm_loss(logits, ids, np.ones_like(mask))[0]
    assert float(full) == pytest.approx(float(want)) and abs(float(full) - float(loss)) > 1e-3


def test_loss_goes_to_zero_on_exactly_predictable_text():
    vocab, length = 16, 12
    cfg = models.DecoderConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=length)
    model = models.DecoderForCausalLM(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)

    def batches():  # x[t + 1] = (x[t] + 1) mod vocab: the current token decides the next
        while True:
            ids = (rng.integers(0, vocab, (16, 1)) + np.arange(length)) % vocab
            yield {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((16, length), np.int32)}

    _, history = train.run(model, causal_lm.lm_loss, optax.adam(1e-2), batches(), steps=150)
    assert history[0]["loss"] > 2.0
    assert history[-1]["loss"] < 0.02 and history[-1]["token_accuracy"] == 1.0


# ----------------------------------------------------------------------------- the recipe
def tiny_config(**train_overrides):
    from configs import pretrain_causal_lm
    config = pretrain_causal_lm.get_config()
    config.publish_default = False
    config.tokenizer.vocab_size = 300
    config.model.update(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=64))
    config.data.update(dict(block_size=32, max_documents=300, max_validation_documents=30))
    config.train.update(dict(num_steps=20, batch_size=16, eval_batch_size=64, learning_rate=1e-2, log_every=10,
                             eval_every=10, checkpoint_every=10, keep_checkpoints=0, async_checkpointing=False,
                             tensorboard=False, progress_bar=False, **train_overrides))
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    results = run_recipe(tiny_config(), str(workdir))
    return str(workdir), results


def _held_out_blocks(model_dir, block_size=32, documents=30):
    tok = data.load_tokenizer(model_dir)
    texts = data.builtin_corpus("validation")[:documents]
    return lm.pack(lm.tokenize_texts(tok, texts), block_size, eos_id=tok.eos_token_id)


def _perplexity(model, blocks):
    return lm.blocks_perplexity(jax.jit(lambda ids: model(ids).logits), blocks, batch_size=64)


def test_pretrain_writes_a_model_with_the_reported_held_out_perplexity(pretrained):
    workdir, results = pretrained
    assert json.load(open(os.path.join(workdir, "results.json"))) == results
    h, t = results["held_out"], results["training"]
    assert results["init"] == "scratch" and h["block_size"] == h["stride"] == 32
    assert h["after"]["perplexity"] < 0.5 * h["before"]["perplexity"]  # it learned
    assert t["steps_this_run"] == 20 and t["tokens_per_step"] == 16 * 32 and t["tokens_per_second"] > 0
    assert results["data"]["train_documents"] == 300 and results["data"]["validation_documents"] == 30

    model_dir = os.path.join(workdir, "model")
    model = models.from_pretrained(model_dir)
    assert isinstance(model, models.DecoderForCausalLM)
    assert model.config.num_key_value_heads == 1 and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(data.load_tokenizer(model_dir)) == 300
    assert results["parameters"] == sum(np.size(v.get_value()) for v in models.named_params(model).values())
    blocks = _held_out_blocks(model_dir)
    assert results["data"]["validation_blocks"] == len(blocks)
    again = _perplexity(model, blocks)
    assert again["perplexity"] == pytest.approx(h["after"]["perplexity"], rel=1e-5)
    assert again["token_accuracy"] == pytest.approx(h["after"]["token_accuracy"])
    assert again["tokens"] == h["scored_tokens"]
    evals = [r["step"] for r in train.read_metrics(workdir) if "eval/perplexity" in r]
    assert evals == [10, 20]


def test_finetune_from_the_default_decoder_dir_on_local_files(pretrained, tmp_path, monkeypatch):
    workdir, _ = pretrained
    monkeypatch.setenv("EFFICIENT_NLP_DECODER_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="configs/pretrain_causal_lm.py"):
        models.default_decoder_dir()
    monkeypatch.setenv("EFFICIENT_NLP_DECODER_DIR", os.path.join(workdir, "model"))
    assert models.default_decoder_dir() == os.path.join(workdir, "model")

    docs = data.builtin_corpus("train")
    (tmp_path / "notes.txt").write_text("\n\n".join(docs[1000:1100]), encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("\n\n".join(docs[1100:1130]), encoding="utf-8")
    from configs import finetune_causal_lm
    config = finetune_causal_lm.get_config()
    assert config.model_dir == causal_lm.DEFAULT_DECODER
    config.data.update(dict(source=str(tmp_path / "notes.txt"), validation=str(tmp_path / "held_out.txt"),
                            block_size=32))
    config.train.update(dict(num_steps=10, batch_size=8, eval_batch_size=64, learning_rate=3e-3,
                             checkpoint_every=0, async_checkpointing=False, tensorboard=False,
                             progress_bar=False))
    out = tmp_path / "ft"
    results = run_recipe(config, str(out))
    assert results["init"] == os.path.join(workdir, "model") and results["data"]["train_documents"] == 100
    h = results["held_out"]
    assert h["after"]["perplexity"] < h["before"]["perplexity"]
    # The starting point is the pre-trained model: "before" is its perplexity on the held-out file.
    tok = data.load_tokenizer(os.path.join(workdir, "model"))
    blocks = lm.pack(lm.tokenize_texts(tok, docs[1100:1130]), 32, eos_id=tok.eos_token_id)
    start = _perplexity(models.from_pretrained(os.path.join(workdir, "model")), blocks)
    assert start["perplexity"] == pytest.approx(h["before"]["perplexity"], rel=1e-5)
    tuned = _perplexity(models.from_pretrained(str(out / "model")), blocks)
    assert tuned["perplexity"] == pytest.approx(h["after"]["perplexity"], rel=1e-5)


def test_bad_data_and_model_settings_are_explained(tmp_path):
    (tmp_path / "a.txt").write_text("one two three\n\nfour five six", encoding="utf-8")
    config = tiny_config()
    config.data.source = str(tmp_path / "a.txt")  # a file has no "validation" split
    with pytest.raises(ValueError, match="held-out file"):
        causal_lm.read_data(config.data)
    config.model_dir = str(tmp_path)  # architecture fields only apply from scratch
    with pytest.raises(ValueError, match="only .*dropout"):
        causal_lm.build_model(config, ["text"])


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(pretrained, tmp_path):
    workdir, results = pretrained
    resumed = tmp_path / "resumed"
    shutil.copytree(os.path.join(workdir, "checkpoints", "10"), resumed / "checkpoints" / "10")
    again = run_recipe(tiny_config(), str(resumed))
    assert again["training"]["steps_this_run"] == 10
    assert again["held_out"]["after"]["perplexity"] == pytest.approx(results["held_out"]["after"]["perplexity"],
                                                                     rel=1e-6)
    a = models.named_params(models.from_pretrained(os.path.join(workdir, "model")))
    b = models.named_params(models.from_pretrained(str(resumed / "model")))
    for name in a:
        np.testing.assert_allclose(np.asarray(b[name].get_value()), np.asarray(a[name].get_value()),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
