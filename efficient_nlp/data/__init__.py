"""Data layer: tasks, local files and hub names, tokenisation, batching, metrics.

    from efficient_nlp import data
    td = data.load_task_data("builtin", tokenizer_dir=model_dir, max_length=64)
    for batch in data.train_batches(td.train, 32, seed=0): ...
    for batch in data.eval_batches(td.dev, 128): ...       # has a float32 "weight"
    data.compute_metrics(td.spec, logits, td.dev["labels"])
    data.save_data_settings(model_dir, config.data.to_dict(), td.spec)   # next to a saved model

See docs/contracts.md ("data") for the array and batch contracts.
"""

from efficient_nlp.data.builtin import builtin_examples, builtin_stats
from efficient_nlp.data import lm  # causal LM data: read_texts, pack, lm_blocks, lm_batches, perplexity
from efficient_nlp.data.corpus import builtin_corpus, corpus_stats
from efficient_nlp.data.lm_tokenizer import train_tokenizer
from efficient_nlp.data.lm_task import LMSpec, lm_metrics, load_lm_task
from efficient_nlp.data.images import load_digits, sample_k_per_class
from efficient_nlp.data.files import SUPPORTED_EXTENSIONS, read_split
from efficient_nlp.data.metrics import (
    accuracy,
    compute_metrics,
    f1_binary,
    matthews_corrcoef,
    pearson,
    spearman,
)
from efficient_nlp.data.pipeline import (
    TaskData,
    eval_batches,
    load_task_data,
    load_tokenizer,
    num_eval_batches,
    tokenize,
    train_batches,
)
from efficient_nlp.data.settings import default_data_config, load_data_settings, merge_data_settings, save_data_settings
from efficient_nlp.data.tasks import TASKS, TaskSpec, get_task, register_task

__all__ = [
    "TASKS",
    "TaskSpec",
    "TaskData",
    "get_task",
    "register_task",
    "load_task_data",
    "load_tokenizer",
    "tokenize",
    "read_split",
    "train_batches",
    "eval_batches",
    "num_eval_batches",
    "compute_metrics",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "builtin_examples",
    "builtin_stats",
    "builtin_corpus",
    "corpus_stats",
    "train_tokenizer",
    "lm",
    "LMSpec",
    "lm_metrics",
    "load_lm_task",
    "SUPPORTED_EXTENSIONS",
    "load_digits",
    "sample_k_per_class",
    "default_data_config",
    "save_data_settings",
    "load_data_settings",
    "merge_data_settings",
]
