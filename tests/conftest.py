"""Shared fixtures: tiny BERT directories that use the embedded MiniLM's real tokenizer."""
import os
import shutil

import jax
import pytest
from flax import nnx

from efficient_nlp import models

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drops jax's compiled programs after each test module: the suite compiles thousands, and
    keeping them all grows the process by gigabytes."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def make_tiny_model_dir(tmp_path_factory):
    """``make(name, model_cls=BertModel, **config) -> dir``: a random tiny model saved as a HF
    directory with MiniLM's tokenizer (vocab 30522); skips when MiniLM is not installed."""
    try:
        minilm = models.default_model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(f"embedded MiniLM not installed: {e}")

    def make(name, model_cls=models.BertModel, **config):
        out = tmp_path_factory.mktemp(name)
        cfg = models.BertConfig(vocab_size=30522, **config)
        models.save_hf_checkpoint(model_cls(cfg, rngs=nnx.Rngs(0)), out)
        for file in TOKENIZER_FILES:
            shutil.copy(os.path.join(minilm, file), out / file)
        return str(out)

    return make


@pytest.fixture(scope="session")
def finetuned_minilm_dir(tmp_path_factory):
    """The embedded MiniLM fine-tuned on the built-in task by configs/quickstart.py (once per
    session, ~10 min on 2 CPU cores): the teacher of the slow compression tests.  Set
    ``EFFICIENT_NLP_TEACHER_DIR`` to a directory written by that recipe (``<workdir>/model``)
    to reuse it."""
    given = os.environ.get("EFFICIENT_NLP_TEACHER_DIR")
    if given:
        if not os.path.exists(os.path.join(given, "model.safetensors")):
            raise FileNotFoundError(f"EFFICIENT_NLP_TEACHER_DIR={given} holds no model.safetensors")
        return given
    try:
        models.default_model_dir()
    except ModuleNotFoundError as e:
        pytest.skip(f"embedded MiniLM not installed: {e}")
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import quickstart
    from efficient_nlp.recipes import run_recipe
    config = quickstart.get_config()
    config.train.progress_bar = False
    workdir = tmp_path_factory.mktemp("quickstart_teacher")
    run_recipe(config, str(workdir))
    return str(workdir / "model")


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    """A random tiny Llama-style decoder (grouped-query attention, 2 layers) saved as a HF
    directory with a byte-level BPE tokenizer (vocab 320) trained on 300 built-in documents."""
    from efficient_nlp import data

    out = tmp_path_factory.mktemp("tiny_decoder")
    tokenizer = data.train_tokenizer(data.builtin_corpus("train")[:300], vocab_size=320, out_dir=str(out))
    cfg = models.DecoderConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                               max_position_embeddings=64, tie_word_embeddings=True,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    models.save_hf_checkpoint(models.DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)), out)
    return str(out)
