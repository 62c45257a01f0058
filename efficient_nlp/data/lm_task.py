"""Causal language modelling as a task of the compression recipes.

`load_lm_task` returns the same `TaskData` the classification tasks give (train / dev arrays,
a spec, the tokenizer), so qat / ptq / prune / distill / finetune run on a decoder unchanged:

* ``train`` / ``dev``: packed blocks of ``block_size`` tokens (`efficient_nlp.data.lm.lm_blocks`)
  as ``input_ids``, ``attention_mask`` (ones), ``token_type_ids`` (zeros, unused by decoders) and
  ``labels`` (the ids again: the targets are the next tokens);
* ``spec``: an `LMSpec` (``kind == "causal_lm"``, ``num_labels`` None); `compute_metrics` gives
  ``perplexity`` = exp(mean next-token NLL), ``nll`` and ``token_accuracy`` for it, over every
  dev block (block length = stride = ``block_size``; the first token of a block is not scored).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from efficient_nlp.data import lm
from efficient_nlp.data.pipeline import TaskData, load_tokenizer


@dataclasses.dataclass(frozen=True)
class LMSpec:
    """The causal-LM "task": its name (the text source), block size and metrics."""

    name: str
    block_size: int
    kind: str = "causal_lm"
    num_labels: None = None
    metrics: tuple = ("perplexity", "nll", "token_accuracy")


def lm_metrics(predictions, labels, weights=None) -> dict[str, float]:
    """Perplexity, mean NLL and token accuracy of logits [N,T,V] predicting ``labels`` [N,T]
    shifted by one (rows with weight 0, eval padding, are left out)."""
    logits = np.asarray(predictions, np.float64)
    ids = np.asarray(labels)
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"causal-LM metrics need logits [N,T,V] and ids [N,T], got {logits.shape} and {ids.shape}")
    if weights is not None:
        keep = np.asarray(weights).reshape(-1) > 0
        logits, ids = logits[keep], ids[keep]
    z = logits[:, :-1]
    z = z - z.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = ids[:, 1:]
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    acc = np.argmax(z, -1) == targets
    mean = float(nll.mean())
    return {"perplexity": float(np.exp(mean)), "nll": mean, "token_accuracy": float(acc.mean())}


def _arrays(blocks: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "token_type_ids": np.zeros_like(blocks),
            "labels": blocks}


def load_lm_task(tokenizer_dir, *, source: str = "builtin", validation: str = "", block_size: int = 128,
                 max_documents: int = 0, eval_blocks: int = 64, max_train_blocks: int = 0) -> TaskData:
    """Train / dev blocks of ``source`` ("builtin", a local .txt / .jsonl / .parquet file or a hub
    dataset) tokenised with the tokenizer in ``tokenizer_dir``.  ``validation``: the held-out
    source ("" = the "validation" split of ``source``; a local file is one split, so give a
    separate file for it).  ``eval_blocks`` / ``max_train_blocks`` cap the splits (0 = all)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    docs = int(max_documents) or None
    train = lm.lm_blocks(tokenizer, source, "train", int(block_size), max_documents=docs)
    if not validation and lm._is_path(source):
        raise ValueError(f"data.source={source!r} is a local file, which holds one split: give the held-out "
                         "text as data.validation (another file)")
    dev = lm.lm_blocks(tokenizer, validation or source, "validation", int(block_size))
    if max_train_blocks:
        train = train[: int(max_train_blocks)]
    if eval_blocks:
        dev = dev[: int(eval_blocks)]
    if len(train) == 0 or len(dev) == 0:
        raise ValueError(f"not enough text for one block of {block_size} tokens (train {len(train)} blocks, "
                         f"held-out {len(dev)}); use a smaller data.max_length or more text")
    return TaskData(train=_arrays(train), dev=_arrays(dev), spec=LMSpec(f"lm:{source}", int(block_size)),
                    tokenizer=tokenizer)
