"""Train a small byte-level BPE tokenizer for causal language modelling.

The tokenizer is GPT-2's design (Radford et al., 2019; BPE of Sennrich et al., 2016, over
bytes): text is split by GPT-2's pre-tokenisation regex, each piece is mapped to bytes
(shown as 256 printable characters), and merges of the most frequent adjacent pairs are
learned up to ``vocab_size``. Every string is encodable (no unknown token) and
``decode(encode(text)) == text`` for any text.

Special tokens: one, ``<|endoftext|>`` with id 0, which is the tokenizer's ``bos_token``,
``eos_token`` and ``pad_token`` (as in GPT-2). Nothing is added when encoding: documents are
separated by an explicit end-of-text id when packed (:func:`efficient_nlp.data.lm.pack`).
As with GPT-2's tokenizer, the literal string ``<|endoftext|>`` inside a text is encoded as
that special token.

Training is deterministic: the same texts and settings give the same vocabulary and merges.
"""

from __future__ import annotations

import os

__all__ = ["ENDOFTEXT", "train_tokenizer", "training_texts"]

ENDOFTEXT = "<|endoftext|>"


def training_texts(texts, min_frequency: int) -> list[str]:
    """``texts`` as a list after the checks every tokenizer trainer makes (a non-empty list of
    str, ``min_frequency >= 1``), with errors that say what was wrong."""
    if int(min_frequency) < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents (a list of str), not a single str")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of str")
    return texts


def train_tokenizer(texts, vocab_size: int = 4096, out_dir=None, *, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts`` (an iterable of str).

    Args:
      texts: training documents.
      vocab_size: total vocabulary size (256 byte symbols + 1 special token + merges); at
        least 257. Fewer merges are learned when no pair reaches ``min_frequency``.
      out_dir: if given, the tokenizer is written there with ``save_pretrained`` so that
        ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.
      min_frequency: a pair must occur at least this often to be merged.

    Returns:
      a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` (id 0) as bos, eos
      and pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(vocab_size)
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + {ENDOFTEXT}), got {vocab_size}")
    texts = training_texts(texts, min_frequency)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=int(min_frequency),
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT
    )
    if out_dir is not None:
        os.makedirs(os.fspath(out_dir), exist_ok=True)
        fast.save_pretrained(os.fspath(out_dir))
    return fast
