"""Shared fixtures: tiny BERT directories that use the embedded MiniLM's real tokenizer."""
import os
import shutil

import pytest
from flax import nnx

from efficient_nlp import models

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


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
