"""Tokenised task data and the batch streams used by training and evaluation.

A tokenised split is a dict of numpy arrays with fixed shapes (docs/contracts.md):
``input_ids``, ``attention_mask``, ``token_type_ids`` int32 [N, max_length] and ``labels``
int32 [N] (float32 for regression).

Batches. ``batch_size`` is always the GLOBAL batch size; host ``p`` of ``P`` gets rows
``[p*b/P, (p+1)*b/P)`` of every global batch.
- ``train_batches``: infinite; epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(N)``,
  global batch ``k`` is slice ``k mod S`` of epoch ``k // S``'s permutation (``S = N // b``;
  the remainder of each epoch is dropped). Batch k is thus a pure function of (seed, k).
- ``eval_batches``: finite, in dataset order; the last batch is filled with copies of row 0 with
  ``weight`` 0 (real rows have weight 1), so every example is seen exactly once over all hosts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import numpy as np

from efficient_nlp.data.files import check_columns, infer_num_labels, read_split, read_table
from efficient_nlp.data.tasks import TaskSpec, get_task

__all__ = [
    "TaskData",
    "TOKENIZER_FILES",
    "load_tokenizer",
    "tokenize",
    "load_task_data",
    "train_batches",
    "eval_batches",
    "num_eval_batches",
]

Arrays = dict[str, np.ndarray]
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class TaskData:
    """Tokenised train and dev splits of a task (``dev`` is None when no dev data was given)."""

    train: Arrays
    dev: Arrays | None
    spec: TaskSpec
    tokenizer: Any

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels


#: Files of which a HF model directory holds at least one when it has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


def load_tokenizer(tokenizer_dir):
    """``transformers.AutoTokenizer.from_pretrained(tokenizer_dir)``; a tokenizer object is returned as is.

    Raises FileNotFoundError when the directory is missing or holds none of `TOKENIZER_FILES`.
    """
    if not isinstance(tokenizer_dir, (str, os.PathLike)):
        return tokenizer_dir
    path = os.fspath(tokenizer_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model directory not found: {path} (give a HF model directory with config.json, model.safetensors "
            "and tokenizer files via --config.model_dir / --config.teacher_dir, or leave it empty for the "
            "default model, the embedded MiniLM for encoder configs)"
        )
    present = sorted(os.listdir(path))
    if not any(name in present for name in TOKENIZER_FILES):
        shown = ", ".join(present[:20]) + (" ..." if len(present) > 20 else "")
        raise FileNotFoundError(
            f"no tokenizer files in model directory {path} (it holds: {shown or 'nothing'}; expected one of "
            f"{', '.join(TOKENIZER_FILES)}): save the tokenizer of the model there with "
            "tokenizer.save_pretrained(<dir>)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, text_a, text_b=None, *, max_length: int = 128, chunk_size: int = 8192) -> Arrays:
    """Tokenise single sentences or pairs: truncated and padded to ``max_length``, int32 arrays.

    Pairs get token_type_ids 0 on ``[CLS] a [SEP]`` and 1 on ``b [SEP]``; truncation of pairs
    removes tokens from the longer segment first.
    """
    text_a = list(text_a)
    if text_b is not None:
        text_b = list(text_b)
        if len(text_b) != len(text_a):
            raise ValueError(f"text_a and text_b differ in length: {len(text_a)} vs {len(text_b)}")
    n = len(text_a)
    out = {k: np.zeros((n, max_length), np.int32) for k in _TOKEN_KEYS}
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        enc = tokenizer(
            text_a[start:stop],
            text_b[start:stop] if text_b is not None else None,
            truncation=True,
            padding="max_length",
            max_length=max_length,
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        for k in _TOKEN_KEYS:
            if k in enc:
                out[k][start:stop] = np.asarray(enc[k], dtype=np.int32)
    return out


def _to_arrays(tokenizer, columns: Mapping[str, Any], spec: TaskSpec, max_length: int) -> Arrays:
    arrays = tokenize(tokenizer, columns["text_a"], columns["text_b"], max_length=max_length)
    dtype = np.float32 if spec.num_labels == 1 else np.int32
    arrays["labels"] = np.asarray(columns["label"], dtype=dtype).reshape(-1)
    return arrays


def _files_spec(name, *, train_file, text_a, text_b, label, num_labels, label_names, metrics):
    """The TaskSpec of your own files, and the train file's table when it was read to infer
    ``num_labels`` (None = infer from the train labels) or to list its columns."""
    key = name.strip().lower()
    if train_file is None:
        raise ValueError(
            f"task {name!r} reads your own files: set train_file (--config.data.train_file=<path>; "
            "csv, tsv, json, jsonl, parquet)"
        )
    table = None
    if text_a is None or (num_labels is None and label_names is None):
        table = read_table(train_file)
        where = os.fspath(train_file)
        if text_a is None:
            raise ValueError(
                f"task {name!r} needs the text column: set text_a (--config.data.text_a=<column>; "
                f"text_b too for sentence pairs); columns in {where}: {list(table)}"
            )
        check_columns(table, where, text_a=text_a, text_b=text_b, label=label or "label")
    if num_labels is None:
        if label_names is not None:
            num_labels = len(label_names)
        else:
            num_labels, label_names = infer_num_labels(table[label or "label"], where, label or "label")
    if metrics is None:
        metrics = ("pearson", "spearman") if num_labels == 1 else ("accuracy",)
    spec = TaskSpec(
        name=key if key == "files" else name,
        text_a=text_a,
        text_b=text_b,
        label=label or "label",
        num_labels=num_labels,
        metrics=tuple(metrics),
        train_file=None,
        dev_file=None,
        label_names=tuple(label_names) if label_names is not None else None,
    )
    return spec, table


def _resolve_spec(task, *, train_file, text_a, text_b, label, num_labels, label_names, metrics):
    """``(spec, train table or None)``: the table when it was read already (see `_files_spec`)."""
    if isinstance(task, TaskSpec):
        spec = task
    else:
        name = str(task)
        try:
            spec = get_task(name)
        except ValueError:
            if name.strip().lower() != "files" and train_file is None:
                raise
            return _files_spec(name, train_file=train_file, text_a=text_a, text_b=text_b, label=label,
                               num_labels=num_labels, label_names=label_names, metrics=metrics)
    changes = {}
    if text_a is not None:
        changes["text_a"] = text_a
    if text_b is not None:
        changes["text_b"] = text_b
    if label is not None:
        changes["label"] = label
    if num_labels is not None and num_labels != spec.num_labels:
        changes["num_labels"] = num_labels
        if spec.label_names is not None and label_names is None:
            changes["label_names"] = None
    if label_names is not None:
        changes["label_names"] = tuple(label_names)
    if metrics is not None:
        changes["metrics"] = tuple(metrics)
    return (spec.replace(**changes) if changes else spec), None


def load_task_data(
    task: str | TaskSpec,
    *,
    tokenizer_dir,
    max_length: int = 128,
    data_dir: str | None = None,
    train_file: str | None = None,
    dev_file: str | None = None,
    text_a: str | None = None,
    text_b: str | None = None,
    label: str | None = None,
    num_labels: int | None = None,
    max_train_examples: int | None = None,
    label_names: tuple[str, ...] | None = None,
    metrics: tuple[str, ...] | None = None,
) -> TaskData:
    """Load, check and tokenise the train and dev splits of a task.

    Args:
      task: a registry name ("sst2", "mnli", "builtin", ...), a TaskSpec, or "files" (or any
        name not in the registry) together with ``train_file`` and ``text_a``.
      tokenizer_dir: model directory holding the tokenizer files (or a tokenizer object).
      max_length: sequence length of every row (truncation and padding).
      data_dir: directory with the task's files in GLUE layout (the task directory or the
        ``glue_data`` root). Without it and without files, GLUE tasks come from the hub.
      train_file, dev_file: explicit files (.csv, .tsv, .json, .jsonl, .parquet); they win over
        ``data_dir``. With ``train_file`` but neither ``dev_file`` nor ``data_dir``, ``dev`` is
        None (local files never mix with the hub). A ``.tsv`` is read in GLUE's layout (no
        quoting; headerless when the spec says so, as for CoLA); a ``.csv`` always has a header.
      text_a, text_b, label: column names (override the spec's).
      num_labels: 1 for regression; overrides the spec's. For "files", None infers it from the
        training labels: the number of distinct names for string labels, ``max id + 1`` for
        integer class ids; non-integer numbers raise (set ``num_labels=1`` for regression).
      max_train_examples: keep only the first this many training rows (file order).
      label_names: string labels, in class-id order (else the spec's; for "files" with string
        labels, the sorted distinct training labels).
      metrics: metric names (else the spec's).
    """
    spec, train_table = _resolve_spec(
        task, train_file=train_file, text_a=text_a, text_b=text_b, label=label, num_labels=num_labels,
        label_names=label_names, metrics=metrics,
    )
    local = data_dir is not None or train_file is not None or dev_file is not None
    if local and data_dir is None and train_file is None:
        raise ValueError(
            "dev_file was given without train_file or data_dir: set --config.data.train_file (or data_dir) too"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    train_cols = read_split(spec, "train", data_dir=data_dir, path=train_file, table=train_table)
    if train_cols.get("label_names") and spec.label_names is None:
        spec = spec.replace(label_names=tuple(train_cols["label_names"]))
    if max_train_examples is not None:
        k = int(max_train_examples)
        train_cols = {key: (v[:k] if isinstance(v, list) else v) for key, v in train_cols.items()}
    if local and dev_file is None and data_dir is None:  # local train file only: no dev split
        dev_cols = None
    else:
        dev_cols = read_split(spec, "dev", data_dir=data_dir, path=dev_file)
    train = _to_arrays(tokenizer, train_cols, spec, max_length)
    dev = _to_arrays(tokenizer, dev_cols, spec, max_length) if dev_cols is not None else None
    return TaskData(train=train, dev=dev, spec=spec, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- batches


def _host(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        try:
            import jax

            default_index, default_count = jax.process_index(), jax.process_count()
        except ImportError:  # the data layer works without jax
            default_index, default_count = 0, 1
        process_index = default_index if process_index is None else process_index
        process_count = default_count if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}")
    return process_index, process_count


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("arrays is empty: expected a dict of numpy arrays")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays differ in their first dimension: {sizes}")
    return next(iter(sizes.values()))


def _check_batch(batch_size: int, process_count: int) -> int:
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % process_count:
        raise ValueError(
            f"global batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    return batch_size


def train_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Arrays]:
    """Infinite stream of host-local training batches; batch k depends only on (seed, k).

    Every example appears exactly once per epoch except the ``N mod batch_size`` rows that fall
    beyond the last full batch of that epoch's permutation (different rows each epoch).
    ``process_index``/``process_count`` default to ``jax.process_index()``/``jax.process_count()``.
    """
    p, count = _host(process_index, process_count)
    b = _check_batch(batch_size, count)
    n = _num_rows(arrays)
    if b > n:
        raise ValueError(f"batch_size {b} is larger than the dataset ({n} examples)")
    if int(start_step) < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    steps_per_epoch = n // b
    lo, hi = p * b // count, (p + 1) * b // count
    arrays = dict(arrays)

    def stream():
        step = int(start_step)
        epoch, perm = -1, None
        while True:
            e, j = divmod(step, steps_per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([int(seed), e]).permutation(n)
            idx = perm[j * b : (j + 1) * b][lo:hi]
            yield {k: v[idx] for k, v in arrays.items()}
            step += 1

    return stream()


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Number of (global) batches ``eval_batches`` yields."""
    return -(-int(num_examples) // int(batch_size))


class _EvalBatches:
    """Finite iterator over padded eval batches; ``len()`` gives the number of batches."""

    def __init__(self, arrays: Arrays, batch_size: int, process_index: int, process_count: int):
        self._arrays = arrays
        self._b = batch_size
        self._n = _num_rows(arrays)
        self._lo = process_index * batch_size // process_count
        self._hi = (process_index + 1) * batch_size // process_count
        self._count = num_eval_batches(self._n, batch_size)
        self._i = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self):
        return self

    def __next__(self) -> Arrays:
        if self._i >= self._count:
            raise StopIteration
        start = self._i * self._b
        self._i += 1
        idx = np.arange(start, start + self._b)
        weight = (idx < self._n).astype(np.float32)
        idx = np.where(idx < self._n, idx, 0)[self._lo : self._hi]
        batch = {k: v[idx] for k, v in self._arrays.items()}
        batch["weight"] = weight[self._lo : self._hi]
        return batch


def eval_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Arrays]:
    """Finite stream of host-local eval batches in dataset order, each with a float32 ``weight``.

    The last global batch is padded with copies of row 0 (weight 0); over all hosts, every
    example appears exactly once with weight 1.
    """
    p, count = _host(process_index, process_count)
    b = _check_batch(batch_size, count)
    arrays = dict(arrays)
    if "weight" in arrays:
        raise ValueError("arrays already has a 'weight' entry; eval_batches adds it")
    return _EvalBatches(arrays, b, p, count)
