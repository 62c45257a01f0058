"""Task specifications: which columns hold the text and labels, how many labels, which metrics.

The GLUE entries describe the files of the original GLUE distribution (``glue_data/SST-2/
train.tsv`` ...: tab separated, one header row except CoLA, no quoting) and the columns of the
same task on the hub (``datasets.load_dataset("glue", "sst2")``), which are named differently.
"""

from __future__ import annotations

import dataclasses

from efficient_nlp.data import builtin as _builtin

__all__ = ["TaskSpec", "TASKS", "get_task", "register_task", "METRIC_NAMES"]

# Names returned by compute_metrics; see efficient_nlp.data.metrics.
METRIC_NAMES = ("accuracy", "f1", "mcc", "pearson", "spearman")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the data layer needs to know about a task.

    Attributes:
      name: registry name ("sst2", "builtin", ...).
      text_a: column of the first (or only) text segment in local files.
      text_b: column of the second segment for pair tasks, else None.
      label: column of the label in local files.
      num_labels: number of classes; 1 means regression (float labels).
      metrics: metric names computed by ``compute_metrics`` (first = main metric).
      train_file, dev_file: file names inside the task directory (GLUE layout).
      glue_dir: GLUE's sub-directory name (``SST-2``), so ``data_dir`` may be the task
        directory or the ``glue_data`` root.
      has_header: False for files whose first row is data (CoLA); then ``column_names``
        names the columns in order.
      column_names: column names of headerless files.
      label_names: when set, labels may be given as these strings and are mapped to their
        index; integer labels are accepted as well.
      hub: ``datasets.load_dataset`` arguments, e.g. ("glue", "sst2"); None if not on the hub.
      hub_dev_split: name of the dev split on the hub.
      hub_columns: (text_a, text_b, label) column names on the hub when they differ.
    """

    name: str
    text_a: str
    text_b: str | None
    label: str
    num_labels: int
    metrics: tuple[str, ...]
    train_file: str | None = "train.tsv"
    dev_file: str | None = "dev.tsv"
    glue_dir: str | None = None
    has_header: bool = True
    column_names: tuple[str, ...] | None = None
    label_names: tuple[str, ...] | None = None
    hub: tuple[str, ...] | None = None
    hub_dev_split: str = "validation"
    hub_columns: tuple[str, str | None, str] | None = None

    def __post_init__(self):
        if self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels must be >= 1 (1 = regression), got {self.num_labels}")
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown metrics {unknown}; known: {list(METRIC_NAMES)}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ValueError(
                f"task {self.name!r}: {len(self.label_names)} label_names for num_labels={self.num_labels}"
            )
        if not self.has_header and not self.column_names:
            raise ValueError(f"task {self.name!r}: a headerless layout needs column_names")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def replace(self, **changes) -> "TaskSpec":
        return dataclasses.replace(self, **changes)


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task in the registry; returns it."""
    TASKS[spec.name] = spec
    return spec


for _spec in (
    TaskSpec(
        "cola", "sentence", None, "label", 2, ("mcc",), glue_dir="CoLA", has_header=False,
        column_names=("source", "label", "original_label", "sentence"), hub=("glue", "cola"),
    ),
    TaskSpec("sst2", "sentence", None, "label", 2, ("accuracy",), glue_dir="SST-2", hub=("glue", "sst2")),
    TaskSpec(
        "mrpc", "#1 String", "#2 String", "Quality", 2, ("f1", "accuracy"), glue_dir="MRPC",
        hub=("glue", "mrpc"), hub_columns=("sentence1", "sentence2", "label"),
    ),
    TaskSpec(
        "qqp", "question1", "question2", "is_duplicate", 2, ("f1", "accuracy"), glue_dir="QQP",
        hub=("glue", "qqp"), hub_columns=("question1", "question2", "label"),
    ),
    TaskSpec(
        "stsb", "sentence1", "sentence2", "score", 1, ("pearson", "spearman"), glue_dir="STS-B",
        hub=("glue", "stsb"), hub_columns=("sentence1", "sentence2", "label"),
    ),
    TaskSpec(
        "mnli", "sentence1", "sentence2", "gold_label", 3, ("accuracy",), dev_file="dev_matched.tsv",
        glue_dir="MNLI", label_names=_NLI3, hub=("glue", "mnli"), hub_dev_split="validation_matched",
        hub_columns=("premise", "hypothesis", "label"),
    ),
    TaskSpec(
        "mnli_mm", "sentence1", "sentence2", "gold_label", 3, ("accuracy",), dev_file="dev_mismatched.tsv",
        glue_dir="MNLI", label_names=_NLI3, hub=("glue", "mnli"), hub_dev_split="validation_mismatched",
        hub_columns=("premise", "hypothesis", "label"),
    ),
    TaskSpec(
        "qnli", "question", "sentence", "label", 2, ("accuracy",), glue_dir="QNLI", label_names=_NLI2,
        hub=("glue", "qnli"),
    ),
    TaskSpec(
        "rte", "sentence1", "sentence2", "label", 2, ("accuracy",), glue_dir="RTE", label_names=_NLI2,
        hub=("glue", "rte"),
    ),
    TaskSpec("wnli", "sentence1", "sentence2", "label", 2, ("accuracy",), glue_dir="WNLI", hub=("glue", "wnli")),
    # Offline task built from the standard library's docstrings (see efficient_nlp.data.builtin).
    TaskSpec(
        "builtin", "text", None, "label", len(_builtin.LABEL_NAMES), ("accuracy",), train_file=None,
        dev_file=None, label_names=_builtin.LABEL_NAMES,
    ),
):
    register_task(_spec)

_ALIASES = {
    "stdlib-docs": "builtin",
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli-m": "mnli",
    "mnli_matched": "mnli",
    "mnli-mm": "mnli_mm",
    "mnli_mismatched": "mnli_mm",
}


def get_task(name: str) -> TaskSpec:
    """The registered TaskSpec called ``name`` (case-insensitive; "stdlib-docs" = "builtin")."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(
            f"unknown task {name!r} (--config.data.task); known tasks: {', '.join(sorted(TASKS))}, "
            "or files for your own data (with --config.data.train_file=<path> --config.data.text_a=<column>)"
        )
    return TASKS[key]
