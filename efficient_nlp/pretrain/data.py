"""Masked-LM pre-training data: a WordPiece tokenizer, encoder blocks and the ids never masked.

    tok = train_wordpiece_tokenizer(builtin_corpus("train"), 4096, "tokenizer_dir")
    blocks = encoder_blocks(tok, builtin_corpus("train"), 128)      # int32 [N, 128]
    for batch in lm.lm_batches(blocks, 32, seed=0): ...              # input_ids, attention_mask
    special_ids(tok)                                                 # (0, 1, 2, 3, 4)

Tokenizer: BERT's WordPiece (Devlin et al., 2019; Wu et al., 2016). Text is normalised
(control characters removed, CJK characters spaced, lowercased and accents stripped when
``lowercase``), split on whitespace and punctuation, and every word is cut greedily into the
longest vocabulary pieces, left to right; a piece that continues a word carries the ``##``
prefix, and a word that cannot be cut is ``[UNK]``. The vocabulary is learned as in the
``tokenizers`` library's WordPiece trainer: start from the characters of the words (and their
``##`` continuation forms) and repeatedly add the concatenation of the most frequent adjacent
pair of pieces inside words, until ``vocab_size`` pieces exist or no pair occurs
``min_frequency`` times. (This is BPE's merge rule, Sennrich et al., 2016; Wu et al. and
Schuster & Nakajima, 2012, pick the pair that most raises the likelihood of the training text
under a unigram model instead. Tokenisation, greedy longest match, is BERT's either way.)

Packing (:func:`encoder_blocks`) follows RoBERTa's FULL-SENTENCES input (Liu et al., 2019):
contiguous text that may cross document boundaries (marked by ``[SEP]``), no next-sentence
prediction, every block ``[CLS] piece [SEP]``.
"""

from __future__ import annotations

import os

import numpy as np

from efficient_nlp.data.lm import join_documents, tokenize_texts
from efficient_nlp.data.lm_tokenizer import training_texts
from efficient_nlp.data.pipeline import load_tokenizer

__all__ = ["SPECIAL_TOKENS", "train_wordpiece_tokenizer", "encoder_blocks", "special_ids"]

#: The special tokens of the tokenizer, in id order: [PAD] = 0, [UNK] = 1, [CLS] = 2, [SEP] = 3, [MASK] = 4.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PREFIX = "##"
_MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT


def _text_pipeline(lowercase: bool):
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=bool(lowercase))
    return normalizer, pre_tokenizers.BertPreTokenizer()


def _alphabets(texts, normalizer, pre_tokenizer) -> tuple[set, set]:
    """(characters of all words, characters that occur after the first one of a word)."""
    chars, continuing = set(), set()
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            chars.update(word)
            continuing.update(word[1:])
    return chars, continuing


def train_wordpiece_tokenizer(texts, vocab_size: int = 4096, out_dir=None, *, min_frequency: int = 2,
                              lowercase: bool = True):
    """Train a BERT WordPiece tokenizer on ``texts`` (an iterable of str); see the module doc.

    Args:
      texts: training documents.
      vocab_size: total vocabulary size: the 5 special tokens, every character of the texts,
        the ``##`` form of every character that continues a word, then learned pieces. Fewer
        pieces are learned when no pair reaches ``min_frequency``.
      out_dir: if given, the tokenizer is written there with ``save_pretrained``, so that
        ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (and the fine-tuning data
        pipeline) loads it.
      min_frequency: a pair must occur at least this often to be added.
      lowercase: lowercase and strip accents (BERT "uncased"); False keeps case and accents.

    Returns:
      a ``transformers.BertTokenizerFast`` with ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2,
      ``[SEP]`` = 3, ``[MASK]`` = 4; ``tok(a)`` gives ``[CLS] a [SEP]`` and ``tok(a, b)``
      gives ``[CLS] a [SEP] b [SEP]`` with token type 1 on ``b [SEP]``.

    Training is deterministic: the same texts and settings give the same vocabulary and ids.
    (The library's trainer numbers the ``##`` characters in hash order, which breaks ties
    between equally frequent pairs differently from run to run; here they are numbered in
    sorted order before training, which fixes every tie.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors, trainers
    from transformers import BertTokenizerFast

    vocab_size = int(vocab_size)
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens "
                         f"{list(SPECIAL_TOKENS)}, got {vocab_size}")
    texts = training_texts(texts, min_frequency)

    normalizer, pre_tokenizer = _text_pipeline(lowercase)
    chars, continuing = _alphabets(texts, normalizer, pre_tokenizer)
    if not chars:
        raise ValueError("texts hold no words (only whitespace or control characters): give real text")
    needed = len(SPECIAL_TOKENS) + len(chars) + len(continuing)
    if vocab_size < needed:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for these texts: the {len(SPECIAL_TOKENS)} special tokens, "
            f"their {len(chars)} distinct characters and the {len(continuing)} '##' forms of the characters "
            f"that continue a word need {needed} entries; use vocab_size >= {needed}")

    # The '##' pieces enter as (temporary) special tokens so that their ids follow sorted order.
    continuing_pieces = [_PREFIX + c for c in sorted(continuing)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=int(min_frequency), show_progress=False,
        special_tokens=list(SPECIAL_TOKENS) + continuing_pieces, continuing_subword_prefix=_PREFIX)
    learner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learner.normalizer, learner.pre_tokenizer = normalizer, pre_tokenizer
    learner.train_from_iterator(texts, trainer=trainer, length=len(texts))
    vocab = learner.get_vocab(with_added_tokens=False)
    if [vocab.get(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError("the WordPiece trainer did not place the special tokens first")

    # The final tokenizer: the learned vocabulary, only the five real special tokens.
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=_MAX_WORD_CHARS))
    tok.normalizer, tok.pre_tokenizer = _text_pipeline(lowercase)
    tok.decoder = decoders.WordPiece(prefix=_PREFIX)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    fast = BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=bool(lowercase), strip_accents=None, tokenize_chinese_chars=True,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    if out_dir is not None:
        os.makedirs(os.fspath(out_dir), exist_ok=True)
        fast.save_pretrained(os.fspath(out_dir))
    return fast


def special_ids(tokenizer) -> tuple[int, ...]:
    """The sorted ids of every special token of ``tokenizer`` (a tokenizer or a directory):
    the ids masked-LM pre-training never selects."""
    tokenizer = load_tokenizer(tokenizer)
    ids = sorted({int(i) for i in tokenizer.all_special_ids if i is not None})
    if not ids:
        raise ValueError("the tokenizer has no special tokens; train one with train_wordpiece_tokenizer")
    return tuple(ids)


def _token_id(tokenizer, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise ValueError(f"the tokenizer has no {name}_token, which encoder blocks need "
                         "(train_wordpiece_tokenizer sets [CLS] and [SEP])")
    return int(value)


def encoder_blocks(tokenizer, texts, block_size: int) -> np.ndarray:
    """Pack documents into encoder inputs: int32 ``[N, block_size]``, each ``[CLS] piece [SEP]``.

    The documents are tokenised without special tokens and joined into one stream with
    ``[SEP]`` between consecutive documents (:func:`efficient_nlp.data.lm.join_documents`,
    without the separator after the last one). The stream is cut into
    ``N = len(stream) // (block_size - 2)`` consecutive pieces of ``block_size - 2`` tokens,
    the ragged tail is dropped, and each piece is wrapped as ``[CLS] piece [SEP]``: the blocks
    without their first and last column, concatenated, are exactly a prefix of the stream.
    A piece may start mid-document and span several documents (RoBERTa's FULL-SENTENCES
    packing; no next-sentence prediction). No block has padding.
    """
    tokenizer = load_tokenizer(tokenizer)
    block_size = int(block_size)
    if block_size < 3:
        raise ValueError(f"block_size must be >= 3 ([CLS], at least one token, [SEP]), got {block_size}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents (a list of str), not a single str")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one document")
    cls, sep = _token_id(tokenizer, "cls"), _token_id(tokenizer, "sep")
    stream = join_documents(tokenize_texts(tokenizer, texts), eos_id=sep)[:-1]  # no [SEP] after the last
    width = block_size - 2
    n = len(stream) // width
    if n == 0:
        raise ValueError(
            f"the {len(texts)} documents hold {len(stream)} tokens (with separators), fewer than "
            f"block_size - 2 = {width}: use a smaller block_size or more text")
    pieces = stream[: n * width].reshape(n, width)
    out = np.empty((n, block_size), np.int32)
    out[:, 0], out[:, 1:-1], out[:, -1] = cls, pieces, sep
    return out
