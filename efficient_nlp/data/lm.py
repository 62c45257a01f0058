"""Causal language-modelling data: read documents, tokenise, pack into blocks, batch, evaluate.

    from efficient_nlp.data import lm, train_tokenizer, builtin_corpus
    tok = train_tokenizer(builtin_corpus("train"), 4096, "tokenizer_dir")
    blocks = lm.lm_blocks(tok, "builtin", "train", 128)           # int32 [N, 128]
    for batch in lm.lm_batches(blocks, 32, seed=0): ...            # input_ids, attention_mask
    stream = lm.lm_stream(tok, "builtin", "validation")            # int32 [L]
    lm.perplexity(logits_fn, stream, block_size=128, stride=64)    # {"perplexity": ..., ...}

Sources (:func:`read_texts`): ``"builtin"`` (the offline corpus of
:mod:`efficient_nlp.data.corpus`), a local file, or a dataset name on the Hugging Face hub
(needs network). Local formats:

- ``.txt``: UTF-8 text; documents are separated by one or more blank (or whitespace-only)
  lines, and the lines of a document are kept verbatim, joined by ``"\\n"``;
- ``.json``/``.jsonl`` (JSON lines or an array of objects) and ``.parquet``: one document per
  row, in the ``text`` column (or ``text_column``), read with ``datasets.load_dataset`` in a
  throw-away cache directory.

Empty documents (None, or only whitespace) are dropped. The ``split`` argument selects the
split of ``"builtin"`` and of hub datasets; a local file is one split and ignores it.

Packing (:func:`pack`) follows GPT-2 (Radford et al., 2019): documents are concatenated, each
followed by the end-of-text id, and the stream is cut into non-overlapping blocks.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from efficient_nlp.data.corpus import builtin_corpus
from efficient_nlp.data.files import _missing_file_error, _quiet_datasets
from efficient_nlp.data.pipeline import _host, load_tokenizer, train_batches

__all__ = [
    "TEXT_EXTENSIONS",
    "read_texts",
    "tokenize_texts",
    "join_documents",
    "pack",
    "lm_stream",
    "lm_blocks",
    "lm_batches",
    "perplexity",
    "blocks_perplexity",
]

TEXT_EXTENSIONS = (".txt", ".json", ".jsonl", ".parquet")
_PROGRESS_MIN_BATCHES = 20


# ----------------------------------------------------------------------------- reading


def _read_txt(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: \r\n becomes \n
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
    docs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _column(ds, text_column: str, where: str) -> list[str]:
    if text_column not in ds.column_names:
        raise ValueError(
            f"{where}: text column {text_column!r} not found; columns present: {list(ds.column_names)}. "
            "Pass text_column=<name>."
        )
    out = []
    for i, value in enumerate(ds[text_column]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}, row {i}: column {text_column!r} holds {type(value).__name__}, expected text")
        if value.strip():
            out.append(value)
    return out


def _read_table(path: str, ext: str, text_column: str) -> list[str]:
    builder = "parquet" if ext == ".parquet" else "json"
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="efficient_nlp_data_") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache)
        except Exception as e:  # arrow/json parse errors: say which file and why
            raise ValueError(f"could not read {path} as {ext[1:]}: {type(e).__name__}: {e}") from e
        return _column(ds, text_column, path)


def _read_local(path: str, text_column: str) -> list[str]:
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: pass one file ({', '.join(TEXT_EXTENSIONS)})")
    ext = os.path.splitext(path)[1].lower()
    if ext not in TEXT_EXTENSIONS:
        raise ValueError(
            f"unsupported file extension {ext or '(none)'!r} for {path}; supported: .txt (documents separated "
            "by blank lines), .json/.jsonl and .parquet (one document per row in a text column)"
        )
    if not os.path.isfile(path):
        raise _missing_file_error(path, "text")
    if ext == ".txt":
        return _read_txt(path)
    return _read_table(path, ext, text_column)


def _read_hub(name: str, split: str, text_column: str, config: str | None) -> list[str]:
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            raise RuntimeError(
                f"could not load the hub dataset {name!r} (config {config!r}, split {split!r}): "
                f"{type(e).__name__}: {e}. Offline, or not a dataset name? Pass a local file "
                f"({', '.join(TEXT_EXTENSIONS)}) or 'builtin'."
            ) from e
        return _column(ds, text_column, f"hub {name} {split}")


def _is_path(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    ext = os.path.splitext(source)[1].lower()
    return os.path.exists(source) or ext in TEXT_EXTENSIONS or source.startswith((".", "~", os.sep))


def read_texts(path_or_name, split: str = "train", *, text_column: str = "text", config: str | None = None) -> list[str]:
    """Documents (list of str) of a source: "builtin", a local file or a hub dataset name.

    A string names a local file when it exists, ends in one of :data:`TEXT_EXTENSIONS`, or
    starts with ``.``, ``~`` or ``/``; ``"builtin"`` always means the built-in corpus (splits
    "train" and "validation"); anything else is passed to ``datasets.load_dataset(name,
    config, split=split)``. See the module docstring for the file formats.
    """
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise TypeError(f"expected a file path or a dataset name, got {type(path_or_name).__name__}")
    if isinstance(path_or_name, str) and path_or_name == "builtin":
        return builtin_corpus(split)
    if _is_path(path_or_name):
        return _read_local(os.path.expanduser(os.fspath(path_or_name)), text_column)
    return _read_hub(path_or_name, split, text_column, config)


# ----------------------------------------------------------------------------- tokens


def tokenize_texts(tokenizer, texts: Iterable[str], *, chunk_size: int = 1024) -> list[list[int]]:
    """Token ids of every text: batched fast tokenizer calls, no special tokens, no truncation."""
    tokenizer = load_tokenizer(tokenizer)
    texts = list(texts)
    out: list[list[int]] = []
    for start in range(0, len(texts), max(int(chunk_size), 1)):
        enc = tokenizer(
            texts[start : start + int(chunk_size)],
            add_special_tokens=False,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no "sequence longer than model_max_length" warning: we pack, not truncate
        )
        out.extend(enc["input_ids"])
    return out


def join_documents(token_lists: Iterable[Sequence[int]], *, eos_id: int) -> np.ndarray:
    """The int32 stream ``doc_1 eos doc_2 eos ... doc_n eos``."""
    arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    stream = np.insert(flat, np.cumsum([len(a) for a in arrays], dtype=np.int64), int(eos_id))
    if stream.size and (stream.min() < 0 or stream.max() >= 2**31):
        raise ValueError(f"token ids must lie in [0, 2**31), got range [{stream.min()}, {stream.max()}]")
    return stream.astype(np.int32)


def pack(token_lists: Iterable[Sequence[int]], block_size: int, *, eos_id: int) -> np.ndarray:
    """Pack documents into non-overlapping blocks: int32 ``[N, block_size]``.

    The stream ``doc_1 eos doc_2 eos ...`` (:func:`join_documents`) is cut into
    ``N = len(stream) // block_size`` consecutive blocks; the last ``len(stream) mod
    block_size`` tokens are dropped, so the blocks, concatenated, are exactly a prefix of the
    stream. A block may start mid-document and span several documents (GPT-2's packing).
    """
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    stream = join_documents(token_lists, eos_id=eos_id)
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def lm_stream(tokenizer, source, split: str = "train", *, text_column: str = "text",
              max_documents: int | None = None, config: str | None = None) -> np.ndarray:
    """Read (:func:`read_texts`), tokenise and join the documents of a source: int32 ``[L]``.

    ``tokenizer`` is a tokenizer or a directory; its ``eos_token_id`` ends every document.
    ``max_documents`` keeps the first documents only (in source order).
    """
    tokenizer = load_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set tokenizer.eos_token (train_tokenizer sets one)")
    texts = read_texts(source, split, text_column=text_column, config=config)
    if max_documents is not None:
        texts = texts[: int(max_documents)]
    if not texts:
        raise ValueError(f"{source} ({split}) has no documents")
    return join_documents(tokenize_texts(tokenizer, texts), eos_id=eos)


def lm_blocks(tokenizer, source, split: str, block_size: int, *, text_column: str = "text",
              max_documents: int | None = None, config: str | None = None) -> np.ndarray:
    """:func:`lm_stream` packed into int32 ``[N, block_size]`` blocks (remainder dropped, see :func:`pack`)."""
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    stream = lm_stream(tokenizer, source, split, text_column=text_column, max_documents=max_documents, config=config)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(
            f"{source} ({split}) has {len(stream)} tokens, fewer than block_size={block_size}: "
            "use a smaller block_size or more text"
        )
    return stream[: n * block_size].reshape(n, block_size)


def lm_batches(blocks: np.ndarray, batch_size: int, *, seed: int, start_step: int = 0,
               process_index: int | None = None, process_count: int | None = None) -> Iterator[dict]:
    """Infinite stream of host-local batches ``{"input_ids": int32 [b, T], "attention_mask": ones}``.

    Shuffling, epochs, resumption and per-host rows follow
    :func:`efficient_nlp.data.pipeline.train_batches`: global batch k is a pure function of
    (seed, k), so the stream from ``start_step=k`` equals the unresumed stream after k
    batches, and host p of P gets rows ``[p*b/P, (p+1)*b/P)`` of every global batch.
    """
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"blocks must be an integer array [N, block_size], got {blocks.dtype} {blocks.shape}")
    inner = train_batches({"input_ids": blocks}, batch_size, seed=seed, start_step=start_step,
                          process_index=process_index, process_count=process_count)

    def stream():
        for batch in inner:
            ids = batch["input_ids"].astype(np.int32, copy=False)
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    return stream()


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=1)
def _token_scores_fn():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def scores(logits, ids):
        """Next-token NLL and argmax hits of targets ids[:, 1:] under logits[:, :-1], in float32."""
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        target = ids[:, 1:]
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return nll, jnp.argmax(logp, axis=-1) == target

    return scores


def _progress(total: int):
    """tqdm for long evaluations on process 0 in a terminal or notebook; None otherwise."""
    if total < _PROGRESS_MIN_BATCHES or _host(None, None)[0] != 0:
        return None
    try:
        interactive = "ipykernel" in sys.modules or sys.stderr.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", dynamic_ncols=True)


def _score(logits_fn: Callable, num_windows: int, window: Callable, block_size: int, batch_size: int) -> dict:
    """Sum NLL and hits over the masked targets of windows 0..num_windows-1, in full batches."""
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scores = _token_scores_fn()
    nll_sum, hits, count = 0.0, 0, 0
    num_batches = -(-num_windows // batch_size)
    bar = _progress(num_batches)
    for b in range(num_batches):
        ids = np.zeros((batch_size, block_size), np.int32)
        mask = np.zeros((batch_size, block_size), bool)  # mask[i, j]: token j is scored (from logits j-1)
        for i in range(min(batch_size, num_windows - b * batch_size)):
            ids[i], mask[i] = window(b * batch_size + i)
        logits = logits_fn(ids)
        shape = tuple(getattr(logits, "shape", ()))
        if len(shape) != 3 or shape[:2] != ids.shape:
            raise ValueError(f"logits_fn returned shape {shape}, expected ({batch_size}, {block_size}, vocab_size)")
        nll, hit = (np.asarray(x) for x in scores(logits, ids))
        m = mask[:, 1:]
        nll_sum += float(np.sum(nll[m], dtype=np.float64))
        hits += int(np.sum(hit[m]))
        count += int(np.sum(m))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    nll_mean = nll_sum / count
    return {"perplexity": math.exp(nll_mean), "nll": nll_mean, "token_accuracy": hits / count, "tokens": count}


def _int_array(x, ndim: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be a {ndim}-D integer array, got {x.dtype} {x.shape}")
    return x


def perplexity(logits_fn: Callable, token_ids, *, block_size: int, stride: int | None = None,
               batch_size: int = 8) -> dict:
    """Perplexity of a causal LM on one token stream, by the sliding-window method.

    Window k covers tokens ``[k*stride, min(k*stride + block_size, L))``; windows continue
    until one reaches the end of the stream. In each window only the tokens not scored by an
    earlier window are scored, each from the logits of the previous position (so with
    ``stride < block_size`` every scored token has at least ``block_size - stride`` tokens
    of context); the first window scores all its tokens but the first. With
    ``stride < block_size`` every token but the first of the stream is thus scored exactly
    once (``tokens == L - 1``). ``stride = block_size`` (the default) gives disjoint windows,
    whose first tokens have no context and are not scored (``tokens == L - num_windows``),
    as in per-block evaluation. This is the strided evaluation of Hugging Face's "Perplexity
    of fixed-length models" guide; smaller strides give more context per token and cost
    ``block_size / stride`` times more model calls.

    ``logits_fn(input_ids int32 [batch_size, block_size]) -> logits [batch_size, block_size, V]``
    is always called with that one shape: the last window is right-padded (padding is never
    scored: the model is causal) and the last batch is filled with unscored windows.
    NLL = -log_softmax(logits)[target], computed in float32 and summed in float64.

    Returns ``{"perplexity": exp(mean NLL), "nll": mean NLL, "token_accuracy": fraction of
    scored tokens that are the argmax prediction, "tokens", "block_size", "stride"}``.
    """
    ids = _int_array(token_ids, 1, "token_ids")
    block_size = int(block_size)
    stride = block_size if stride is None else int(stride)
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}] (no token left unscored), got {stride}")
    n = len(ids)
    if n < 2:
        raise ValueError(f"token_ids has {n} tokens: need at least 2 to score one")
    num_windows = 1 + max(0, -(-(n - block_size) // stride))

    def window(k):
        start = k * stride
        end = min(start + block_size, n)
        first = max(start + 1, (k - 1) * stride + block_size if k else 0)  # after the previous window's end
        row = np.zeros(block_size, np.int32)
        row[: end - start] = ids[start:end]
        mask = np.zeros(block_size, bool)
        mask[first - start : end - start] = True
        return row, mask

    out = _score(logits_fn, num_windows, window, block_size, batch_size)
    return {**out, "block_size": block_size, "stride": stride}


def blocks_perplexity(logits_fn: Callable, blocks, batch_size: int = 8) -> dict:
    """Perplexity over packed blocks ``[N, T]`` (e.g. from :func:`lm_blocks`): each block is
    scored independently, every token but its first. Same return value as :func:`perplexity`
    (with ``block_size == stride == T``)."""
    blocks = _int_array(blocks, 2, "blocks")
    n, t = blocks.shape
    if n < 1 or t < 2:
        raise ValueError(f"blocks must have at least one block of at least 2 tokens, got shape {blocks.shape}")
    scored = np.ones(t, bool)
    scored[0] = False
    out = _score(logits_fn, n, lambda k: (blocks[k], scored), t, batch_size)
    return {**out, "block_size": t, "stride": t}
