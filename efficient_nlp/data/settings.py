"""The data settings a fine-tuned model was trained with, saved next to the model.

``save_data_settings`` writes ``<model_dir>/efficient_nlp_data.json``: the ``config.data`` section as the
run used it (task, files as absolute paths, columns, ``num_labels`` with the inferred value,
``max_length``, ``max_train_examples``) plus ``label_names`` (the class names in class-id order,
or null), and gives ``config.json``'s ``id2label`` / ``label2id`` the real class names so that
``transformers`` users see them. ``load_data_settings`` reads the file back, and
``merge_data_settings`` fills a compression recipe's data section with it, so that a fine-tuned
model given as the teacher brings its task along (docs/your_data.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from efficient_nlp.data.tasks import TaskSpec

__all__ = ["SETTINGS_FILE", "SOURCE_KEYS", "default_data_config", "save_data_settings", "load_data_settings",
           "merge_data_settings"]

SETTINGS_FILE = "efficient_nlp_data.json"
#: Keys of the data section that say which data a model was trained on (reused together or not at all).
SOURCE_KEYS = ("task", "data_dir", "train_file", "dev_file", "text_a", "text_b", "label", "num_labels")


def default_data_config() -> dict:
    """A recipe's ``config.data`` section as the config files build it when nothing is changed: the
    built-in task at 64 tokens (``num_labels`` 0: from the task registry, or inferred from the train
    file's labels for ``files``; ``max_train_examples`` 0: all)."""
    return dict(task="builtin", data_dir="", train_file="", dev_file="", text_a="", text_b="", label="",
                num_labels=0, max_length=64, max_train_examples=0)


_PATH_KEYS = ("data_dir", "train_file", "dev_file")
_STRING_KEYS = ("task", "data_dir", "train_file", "dev_file", "text_a", "text_b", "label")


def _write_json(path: str, obj, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON through a temporary file, so a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, ensure_ascii=False)
    os.replace(tmp, path)


def _name_classes(config_path: str, label_names: tuple[str, ...]) -> None:
    """Set HF's ``id2label`` / ``label2id`` in ``config_path`` to ``label_names`` (class-id order)."""
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} not found: save the model first (save_data_settings writes the class names "
            "into its config.json)"
        )
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    n = len(hf.get("id2label") or {}) or hf.get("num_labels")
    if n and n != len(label_names):
        raise ValueError(
            f"{config_path} describes a head with {n} labels but the data has {len(label_names)} classes "
            f"{list(label_names)}: save the model trained on this data"
        )
    hf["id2label"] = {str(i): name for i, name in enumerate(label_names)}
    hf["label2id"] = {name: i for i, name in enumerate(label_names)}
    _write_json(config_path, hf, sort_keys=True)  # sorted, as save_hf_checkpoint writes it


def save_data_settings(model_dir, data_config: Mapping[str, Any], spec: TaskSpec) -> str:
    """Write ``<model_dir>/efficient_nlp_data.json`` and name the classes in ``<model_dir>/config.json``.

    Args:
      model_dir: the saved model's HF directory (its ``config.json`` must exist when ``spec`` has
        ``label_names``: call this after saving the model).
      data_config: the ``config.data`` section of the run (a dict: ``config.data.to_dict()``).
      spec: the TaskSpec the data was loaded with (``TaskData.spec``): its name, columns,
        ``num_labels`` (also when inferred) and ``label_names`` are written, not the section's.

    Relative paths (``data_dir``, ``train_file``, ``dev_file``) are made absolute, so that a run
    from another working directory finds the files. Returns the path of efficient_nlp_data.json.
    """
    model_dir = os.fspath(model_dir)
    given = dict(data_config)
    settings = {
        "task": spec.name,
        **{key: os.path.abspath(os.fspath(given[key])) if given.get(key) else "" for key in _PATH_KEYS},
        "text_a": spec.text_a,
        "text_b": spec.text_b or "",
        "label": spec.label,
        "num_labels": spec.num_labels,
        "label_names": list(spec.label_names) if spec.label_names is not None else None,
    }
    settings.update({k: v for k, v in given.items() if k not in settings})  # max_length, max_train_examples, ...
    os.makedirs(model_dir, exist_ok=True)
    if spec.label_names is not None:
        _name_classes(os.path.join(model_dir, "config.json"), spec.label_names)
    path = os.path.join(model_dir, SETTINGS_FILE)
    _write_json(path, settings)
    return path


def _problems(settings: dict) -> list[str]:
    out = []
    for key in _STRING_KEYS:
        if key in settings and not isinstance(settings[key], str):
            out.append(f"{key} must be a string, got {settings[key]!r}")
    if not settings.get("task"):
        out.append("task is missing")
    for key in ("num_labels", "max_length"):
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            out.append(f"{key} must be an integer >= 1, got {value!r}")
    names = settings.get("label_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            out.append(f"label_names must be a list of strings or null, got {names!r}")
        elif isinstance(settings.get("num_labels"), int) and len(names) != settings["num_labels"]:
            out.append(f"{len(names)} label_names for num_labels={settings['num_labels']}")
    return out


def load_data_settings(model_dir) -> dict | None:
    """The data settings saved with the model in ``model_dir`` (``label_names`` as a tuple or
    None), or None when it has none. Raises ValueError naming the file when it is not valid JSON
    or lacks what `save_data_settings` writes.
    """
    path = os.path.join(os.fspath(model_dir), SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix or delete it") from None
    problems = _problems(settings) if isinstance(settings, dict) else [f"expected a JSON object, got {settings!r}"]
    if problems:
        raise ValueError(
            f"{path} is malformed: {'; '.join(problems)} (it holds the data section a fine-tuning run used, "
            "as save_data_settings writes it): fix or delete it"
        )
    names = settings.get("label_names")
    settings["label_names"] = tuple(names) if names is not None else None
    return settings


def merge_data_settings(data: Mapping[str, Any], defaults: Mapping[str, Any], saved: Mapping[str, Any] | None) -> dict:
    """The data section a recipe runs on: ``data`` with a teacher's ``saved`` settings filled in.

    When every `SOURCE_KEYS` entry of ``data`` equals its value in ``defaults`` (the config's
    untouched data section), the data is the teacher's: those keys and ``label_names`` come from
    ``saved``. Any other key of ``data`` (``max_length``, ``max_train_examples``) takes the saved
    value where it is at its default. A data section that names its own data (any source key
    changed) is kept as is, with ``label_names`` None; so is ``data`` when ``saved`` is None.
    Returns a new dict with every key of ``data`` plus ``label_names``.
    """
    out = {**dict(data), "label_names": None}
    if saved is None or any(data.get(k) != defaults.get(k) for k in SOURCE_KEYS):
        return out
    for key in data:
        if key in saved and (key in SOURCE_KEYS or data[key] == defaults.get(key)):
            out[key] = saved[key]
    out["label_names"] = saved.get("label_names")
    return out
