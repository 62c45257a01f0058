"""The built-in offline task ``builtin`` ("stdlib-docs").

Where the text comes from
-------------------------
Every example is a real, human-written sentence or paragraph: the *first paragraph of a
docstring* (module, class, function or method) found in the source files of the Python
standard library that runs this code. Nothing is downloaded and nothing is cached on disk:
the sources are located with :func:`importlib.util.find_spec` (the packages are never
imported) and parsed with :mod:`ast` each time the task is built (about a second).

Labels
------
The label says which part of the standard library a docstring comes from. Each class is a
*package family*: a main package plus a few small modules on the same subject (``email``
also takes ``smtplib``/``imaplib``/``poplib``; ``http`` also takes ``urllib``, ``wsgiref``
and ``socketserver``; ``pathlib`` also takes ``shutil``, ``tarfile``, ``zipfile`` and
``tempfile``; ...). See :data:`PACKAGE_GROUPS`. The topics overlap on purpose
(``asyncio`` vs ``multiprocessing`` vs ``http`` all talk about connections, processes,
streams and errors), so a fine-tuned small encoder does well but not perfectly.

Cleaning
--------
- the docstring is taken with :func:`ast.get_docstring` (indentation removed), cut at the
  first blank line (its first paragraph), and its whitespace collapsed to single spaces;
- texts shorter than :data:`MIN_WORDS` words, and texts that are doctest-only (start with
  ``>>>``) are dropped;
- **no label leakage**: every occurrence of any module name listed in
  :data:`PACKAGE_GROUPS` (whole word, any case, also as the head of a dotted name such as
  ``email.message``) is replaced by the neutral token :data:`MASK_TOKEN`, in *every* class
  alike, so the token itself carries no information about the label;
- deduplication happens on the final (masked) text: repeats within one class are kept once,
  a text found under two classes is dropped from both.

Split
-----
A text goes to ``dev`` when the first 8 hex digits of its SHA-256 are, as an integer,
``< DEV_FRACTION * 16**8`` (about 15%), else to ``train``: the split of an example does not
depend on file order, on the other examples or on the Python version. Examples are ordered
by that hash too. Exact counts vary slightly between Python versions (the standard library's
docstrings change a little); on CPython 3.11-3.13 the task has about 2,400 examples in 9
classes.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import sysconfig
import tokenize
from collections import Counter
from typing import Iterator

__all__ = [
    "PACKAGE_GROUPS",
    "LABEL_NAMES",
    "MASK_TOKEN",
    "MIN_WORDS",
    "DEV_FRACTION",
    "Example",
    "builtin_examples",
    "load_builtin_split",
    "split_of",
    "builtin_stats",
]

# (label name, modules whose docstrings make up that class). Only modules that exist as
# Python sources on CPython 3.11, 3.12 and 3.13 in every usual build (no tkinter/idlelib).
PACKAGE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("email", ("email", "smtplib", "imaplib", "poplib")),
    ("xml", ("xml", "xmlrpc", "html")),
    ("asyncio", ("asyncio", "selectors")),
    ("unittest", ("unittest", "doctest")),
    ("multiprocessing", ("multiprocessing", "concurrent", "threading")),
    ("http", ("http", "urllib", "wsgiref", "socketserver")),
    ("logging", ("logging",)),
    ("importlib", ("importlib", "pkgutil")),
    ("pathlib", ("pathlib", "shutil", "tarfile", "zipfile", "tempfile")),
)
LABEL_NAMES: tuple[str, ...] = tuple(name for name, _ in PACKAGE_GROUPS)
MASK_TOKEN = "PKG"
MIN_WORDS = 5
DEV_FRACTION = 0.15

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_ALL_MODULES = tuple(sorted({m for _, mods in PACKAGE_GROUPS for m in mods}, key=len, reverse=True))
_MASK_RE = re.compile(r"(?<![\w])(?:" + "|".join(map(re.escape, _ALL_MODULES)) + r")(?![\w])", re.IGNORECASE)
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")


@dataclasses.dataclass(frozen=True)
class Example:
    text: str
    label: int
    split: str  # "train" or "dev"


def split_of(text: str) -> str:
    """'dev' or 'train', from the SHA-256 of the text alone."""
    h = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)
    return "dev" if h < DEV_FRACTION * 16**8 else "train"


def _source_files(module: str) -> list[str]:
    """The .py files of a stdlib module or package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise RuntimeError(f"standard-library module {module!r} not found by importlib.util.find_spec")
    if spec.submodule_search_locations:
        files = []
        for root in sorted(spec.submodule_search_locations):
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
        return files
    origin = spec.origin
    if not origin or not os.path.isfile(origin):  # frozen module: its source is still in Lib/
        origin = os.path.join(sysconfig.get_paths()["stdlib"], module + ".py")
    if not os.path.isfile(origin):
        raise RuntimeError(f"no Python source for standard-library module {module!r}")
    return [origin]


def _docstrings(path: str) -> Iterator[str]:
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _clean(doc: str) -> str | None:
    para = _PARAGRAPH_RE.split(doc.strip(), maxsplit=1)[0]
    if para.lstrip().startswith(">>>"):
        return None
    text = " ".join(para.split())
    text = _MASK_RE.sub(MASK_TOKEN, text)
    if len(text.split()) < MIN_WORDS:
        return None
    return text


@functools.lru_cache(maxsize=1)
def builtin_examples() -> tuple[Example, ...]:
    """All examples of the task, ordered by the hash of their text."""
    owners: dict[str, set[int]] = {}
    for label, (_, modules) in enumerate(PACKAGE_GROUPS):
        for module in modules:
            for path in _source_files(module):
                for doc in _docstrings(path):
                    text = _clean(doc)
                    if text is not None:
                        owners.setdefault(text, set()).add(label)
    keyed = []
    for text, labels in owners.items():
        if len(labels) == 1:
            keyed.append((hashlib.sha256(text.encode("utf-8")).hexdigest(), text, next(iter(labels))))
    keyed.sort()
    return tuple(Example(text, label, split_of(text)) for _, text, label in keyed)


def load_builtin_split(split: str) -> dict[str, list]:
    """Columns ``text`` (str) and ``label`` (int) of the 'train' or 'dev' split."""
    if split not in ("train", "dev"):
        raise ValueError(f"builtin task has splits 'train' and 'dev', not {split!r}")
    rows = [e for e in builtin_examples() if e.split == split]
    return {"text": [e.text for e in rows], "label": [e.label for e in rows]}


def builtin_stats() -> dict:
    """Sizes per split and per class (by label name)."""
    ex = builtin_examples()
    per_class = Counter(LABEL_NAMES[e.label] for e in ex)
    return {
        "num_examples": len(ex),
        "train": sum(e.split == "train" for e in ex),
        "dev": sum(e.split == "dev" for e in ex),
        "per_class": {name: per_class.get(name, 0) for name in LABEL_NAMES},
        "mean_words": sum(len(e.text.split()) for e in ex) / max(len(ex), 1),
    }
