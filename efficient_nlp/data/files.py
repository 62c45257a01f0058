"""Read one split of a task into plain Python columns, through ``datasets.load_dataset``.

Sources, in order of precedence:
  1. an explicit file (``path``): .csv, .tsv, .json/.jsonl, .parquet;
  2. ``data_dir`` with the task's file names (GLUE layout: ``data_dir/train.tsv`` or
     ``data_dir/<GLUE dir>/train.tsv``);
  3. the built-in offline task;
  4. the hub (``datasets.load_dataset(*spec.hub, split=...)``), which needs network.

Formats:
  - .tsv is GLUE's layout: tab separated, no quoting (quote characters are text), header row
    unless the spec says otherwise (CoLA), UTF-8 with an optional BOM;
  - .csv is comma separated with standard double-quote quoting and a header row;
  - .json/.jsonl are JSON lines (or a JSON array of objects); .parquet is read as is.
  In csv/tsv every column is read as a string (so "NA" or "1996" stay text) and labels are
  converted here, which makes identical content give identical values in every format.

Local files are prepared in a throw-away cache directory (removed before returning), so no
Arrow cache accumulates anywhere; hub downloads use datasets' usual user cache.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import warnings
from typing import Any

from efficient_nlp.data.tasks import TASKS, TaskSpec

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "read_split",
    "read_table",
    "resolve_file",
    "check_columns",
    "examples_from_columns",
    "infer_label_names",
    "infer_num_labels",
]

SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")

# A split as returned by read_split: {"text_a": [str], "text_b": [str] or None, "label": [int|float],
# "label_names": tuple of str or None (the names string labels were mapped with)}
Columns = dict[str, Any]


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"unsupported file extension {ext or '(none)'!r} for {path}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return ext


def _missing_file_error(path: str, what: str, flag: str | None = None) -> FileNotFoundError:
    """``what`` file not found, with what its directory holds and, when given, the setting to check."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        present = sorted(os.listdir(directory))
        shown = ", ".join(present[:30]) + (" ..." if len(present) > 30 else "")
        where = f"{directory} contains: {shown or '(nothing)'}"
    else:
        where = f"directory {directory} does not exist"
    check = f"; check {flag}" if flag else ""
    return FileNotFoundError(f"{what} file not found: {path} ({where}){check}")


def _existing_file(path, split: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _missing_file_error(path, split, f"{split}_file (--config.data.{split}_file)")
    return path


def resolve_file(spec: TaskSpec, split: str, *, data_dir: str | None = None, path: str | None = None) -> str | None:
    """The local file for ``split`` ('train' or 'dev'), or None when none is configured."""
    if path is not None:
        return _existing_file(path, split)
    if data_dir is None:
        return None
    name = spec.train_file if split == "train" else spec.dev_file
    if name is None:
        raise ValueError(
            f"task {spec.name!r} has no {split} file name: set {split}_file (--config.data.{split}_file=<path>)"
        )
    data_dir = os.fspath(data_dir)
    candidates = [os.path.join(data_dir, name)]
    if spec.glue_dir:
        candidates.append(os.path.join(data_dir, spec.glue_dir, name))
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise _missing_file_error(candidates[0], f"{spec.name} {split}", "data_dir (--config.data.data_dir)")


@contextlib.contextmanager
def _quiet_datasets():
    """Silence datasets' progress bars and info logs for the duration of a load, then restore them."""
    import datasets

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    with warnings.catch_warnings():  # warns when HF_DATASETS_DISABLE_PROGRESS_BARS=0 overrides us
        warnings.simplefilter("ignore")
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets.enable_progress_bars()


def _header(path: str, delimiter: str, quoting: int) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        row = next(csv.reader(f, delimiter=delimiter, quoting=quoting), None)
    if not row:
        raise ValueError(f"{path} is empty: expected a header row")
    return row


def read_table(path, *, split: str = "train", has_header: bool = True,
               column_names: tuple[str, ...] | None = None) -> dict[str, list]:
    """All columns of the local file ``path`` (the ``split`` file: named in errors) as lists.

    csv/tsv cells are strings; a headerless .tsv (``has_header=False``, GLUE's CoLA) takes its
    column names from ``column_names``.
    """
    path = _existing_file(path, split)
    ext = _extension(path)
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="efficient_nlp_data_") as cache:
        kwargs: dict[str, Any] = {}
        if ext in (".csv", ".tsv"):
            builder = "csv"
            delimiter = "\t" if ext == ".tsv" else ","
            quoting = csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL
            if has_header or ext == ".csv":  # headerless layouts are a GLUE (.tsv) matter
                names = _header(path, delimiter, quoting)
                kwargs["header"] = 0
            else:
                names = list(column_names)
                kwargs.update(header=None, column_names=names)
            if len(set(names)) != len(names):
                raise ValueError(f"{path}: duplicate column names in header {names}")
            kwargs.update(
                delimiter=delimiter,
                quoting=quoting,
                encoding="utf-8-sig",
                keep_default_na=False,
                na_filter=False,
                features=datasets.Features({n: datasets.Value("string") for n in names}),
            )
        elif ext in (".json", ".jsonl"):
            builder = "json"
        else:
            builder = "parquet"
        try:
            ds = datasets.load_dataset(builder, data_files={"data": path}, split="data", cache_dir=cache, **kwargs)
        except Exception as e:  # pandas/arrow parse errors: say which file and why
            root = e
            while root.__cause__ is not None or root.__context__ is not None:
                root = root.__cause__ or root.__context__
            reason = f"{type(e).__name__}: {e}" + (f" ({type(root).__name__}: {str(root).strip()})" if root is not e else "")
            raise ValueError(f"could not read {path} as {ext[1:]}: {reason}") from e
        return ds.to_dict()


def _load_hub(spec: TaskSpec, split: str) -> dict[str, list]:
    hub_split = "train" if split == "train" else spec.hub_dev_split
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(*spec.hub, split=hub_split)
        except Exception as e:
            raise RuntimeError(
                f"could not load {spec.name} {split} from the hub ({'/'.join(spec.hub)}, split {hub_split!r}): "
                f"{type(e).__name__}: {e}. Offline? Set data_dir (--config.data.data_dir, GLUE layout) or "
                "train_file / dev_file (--config.data.train_file, --config.data.dev_file)."
            ) from e
        return ds.to_dict()


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _convert_label(value, row: int, spec: TaskSpec, where: str, label_names: tuple[str, ...] | None):
    def bad(msg):
        return ValueError(f"{where}, row {row} (0-based, header not counted): label {value!r} {msg}")

    if _is_missing(value):
        raise bad("is missing")
    if spec.num_labels == 1:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad(
                "is not a number, which regression (num_labels=1) needs; for classes set "
                "--config.data.num_labels to 0 or their number"
            ) from None
        if not math.isfinite(out):
            raise bad("is not finite")
        return out
    if isinstance(value, str):
        s = value.strip()
        if label_names is not None and s in label_names:
            return label_names.index(s)
        try:
            num = float(s)
        except ValueError:
            known = f"; known labels: {list(label_names)}" if label_names else ""
            raise bad(f"is not a class id in [0, {spec.num_labels}){known}") from None
    elif isinstance(value, bool):
        num = float(int(value))
    elif isinstance(value, (int, float)):
        num = float(value)
    else:
        raise bad(f"has unsupported type {type(value).__name__}")
    if not math.isfinite(num) or num != int(num) or not 0 <= num < spec.num_labels:
        raise bad(
            f"is out of range: expected a class id in [0, {spec.num_labels}) "
            f"(num_labels={spec.num_labels}; set --config.data.num_labels if there are more classes)"
        )
    return int(num)


def check_columns(table: dict[str, list], where: str, **columns: str | None) -> None:
    """Raise ValueError naming the ``--config.data`` key when a column (role=name, e.g.
    ``text_a="sentence"``; None = not used) is not in ``table``."""
    for role, col in columns.items():
        if col is not None and col not in table:
            raise ValueError(
                f"{where}: {role} column {col!r} not found: set {role} (--config.data.{role}=<column>); "
                f"columns present: {list(table)}"
            )


def examples_from_columns(
    spec: TaskSpec, table: dict[str, list], where: str, label_names: tuple[str, ...] | None = None
) -> Columns:
    """Pick and check the spec's columns of a loaded table; labels become int (or float)."""
    check_columns(table, where, text_a=spec.text_a, text_b=spec.text_b, label=spec.label)
    n = len(table[spec.label])
    out: Columns = {"text_a": [], "text_b": [] if spec.text_b else None, "label": []}
    for role, col in (("text_a", spec.text_a), ("text_b", spec.text_b)):
        if col is None:
            continue
        values = table[col]
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise ValueError(f"{where}, row {i} (0-based, header not counted): {role} column {col!r} is empty")
        out[role] = [v if isinstance(v, str) else str(v) for v in values]
    names = label_names if label_names is not None else spec.label_names
    out["label"] = [_convert_label(v, i, spec, where, names) for i, v in enumerate(table[spec.label])]
    assert all(len(v) == n for v in out.values() if v is not None)
    return out


def _string_label_names(values: list) -> tuple[str, ...] | None:
    """The sorted distinct labels when some label is a non-numeric string, else None."""
    strings = {v.strip() for v in values if isinstance(v, str) and v.strip()}

    def numeric(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    if not strings or all(numeric(s) for s in strings):
        return None
    return tuple(sorted(strings))


def infer_label_names(spec: TaskSpec, table: dict[str, list]) -> tuple[str, ...] | None:
    """For an unregistered task without label_names whose labels are non-numeric strings: their sorted set.

    Registered tasks never infer (a stray string there is an error, not a new class).
    """
    if spec.label_names is not None or spec.num_labels == 1 or spec.label not in table:
        return None
    if TASKS.get(spec.name) is not None and TASKS[spec.name].label == spec.label:
        return None
    return _string_label_names(table[spec.label])


def infer_num_labels(values: list, where: str, column: str = "label") -> tuple[int, tuple[str, ...] | None]:
    """``(num_labels, label_names)`` of a classification label column (the train split).

    String labels (some not numbers): their sorted distinct names. Integer class ids (ints,
    or numbers/strings with an integral value): ``max id + 1`` and no names. Missing values are
    skipped here (``examples_from_columns`` reports them with their row). Raises ValueError for
    non-integer numbers (a regression: ``num_labels=1``), negative ids and a single class.
    """
    names = _string_label_names(values)
    if names is not None:
        if len(names) < 2:
            raise ValueError(
                f"{where}: label column {column!r} has a single class {names[0]!r}: a classifier needs two "
                "or more (set --config.data.num_labels=<n> if the dev file has the others)"
            )
        return len(names), names
    top = -1
    for row, value in enumerate(values):
        if _is_missing(value):
            continue
        try:
            num = float(value)
        except (TypeError, ValueError):
            continue  # not a label at all: examples_from_columns names the row
        if not math.isfinite(num):
            continue
        at = f"{where}, row {row} (0-based, header not counted): label {value!r}"
        if num != int(num):
            raise ValueError(
                f"{at} is not an integer class id; this looks like regression: set --config.data.num_labels=1 "
                "(or give class ids 0, 1, 2, ... or class names)"
            )
        if num < 0:
            raise ValueError(f"{at} is negative: class ids are 0, 1, 2, ... (or give class names)")
        top = max(top, int(num))
    if top < 0:
        raise ValueError(f"{where}: label column {column!r} has no labels")
    if top == 0:
        raise ValueError(
            f"{where}: every label in column {column!r} is 0: a classifier needs two or more classes "
            "(set --config.data.num_labels=<n>; 1 = regression)"
        )
    return top + 1, None


def read_split(
    spec: TaskSpec,
    split: str,
    *,
    data_dir: str | None = None,
    path: str | None = None,
    label_names: tuple[str, ...] | None = None,
    table: dict[str, list] | None = None,
) -> Columns:
    """One split ('train' or 'dev') as ``{"text_a": [...], "text_b": [...] | None, "label": [...],
    "label_names": ...}``; labels are int class ids (float for regression), checked against the spec.

    ``label_names`` maps string labels to class ids; without it the spec's are used, and for a
    spec without any, string labels in a local file are mapped by their sorted distinct values.
    ``table`` is the local file's content when the caller has read it already (`read_table`).
    """
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    file = resolve_file(spec, split, data_dir=data_dir, path=path)
    if file is not None:
        if table is None:
            table = read_table(file, split=split, has_header=spec.has_header, column_names=spec.column_names)
        names = label_names or spec.label_names or infer_label_names(spec, table)
        if names is not None and spec.label_names is None and len(names) != spec.num_labels:
            raise ValueError(
                f"{file}: found {len(names)} string labels {list(names)} but num_labels={spec.num_labels}: "
                f"set --config.data.num_labels={len(names)} (or 0 to count them)"
            )
        out = examples_from_columns(spec, table, file, names)
        out["label_names"] = names
        return out
    if spec.name == "builtin":
        from efficient_nlp.data.builtin import load_builtin_split

        out = examples_from_columns(spec, load_builtin_split(split), f"builtin {split}", label_names)
        out["label_names"] = spec.label_names
        return out
    if spec.hub:
        a, b, lab = spec.hub_columns or (spec.text_a, spec.text_b, spec.label)
        hub_spec = spec.replace(text_a=a, text_b=b, label=lab, label_names=None)
        where = f"hub {'/'.join(spec.hub)} {split}"
        out = examples_from_columns(hub_spec, _load_hub(spec, split), where, None)
        out["label_names"] = spec.label_names
        return out
    raise ValueError(
        f"task {spec.name!r}: no {split} data: set data_dir (--config.data.data_dir) or {split}_file "
        f"(--config.data.{split}_file; csv, tsv, json, jsonl, parquet)"
    )
