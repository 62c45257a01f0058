"""The built-in offline language-modelling corpus ("stdlib-text").

Where the text comes from
-------------------------
Every document is real, human-written English found in the standard library of the Python
that runs this code; nothing is downloaded and nothing is stored in this repository. Two
sources, both read from source files located with :func:`importlib.util.find_spec` (no
package is imported) and parsed with :mod:`ast` when the corpus is first built (a few
seconds, then cached in memory for the process):

- the whole docstring (every paragraph) of each module, class, function and method of the
  modules in :data:`MODULES` (a fixed list of about 160 modules and packages present as
  Python source on CPython 3.11-3.13; test directories are skipped; a module missing from
  an unusual build is skipped and counted in :func:`corpus_stats`);
- the help topics of ``pydoc_data.topics`` (the Python Language Reference sections that
  ``help("if")`` prints), one document per topic.

Cleaning
--------
Docstrings are dedented by :func:`ast.get_docstring`; then each document is split into
paragraphs at blank lines. reST underlines (lines made only of ``*``, ``=``, ``-``, ``~``
or ``^``) are dropped. A paragraph of plain prose is reflowed to one line (whitespace runs
become one space); a paragraph with an indented line or a ``>>>`` prompt (code, grammar,
tables, lists) keeps its lines, with tabs expanded and trailing spaces removed. Paragraphs
are joined with one newline, so **no document contains a blank line** (a ``.txt`` file
with documents separated by blank lines round-trips through :func:`efficient_nlp.data.lm.read_texts`).
Documents with fewer than :data:`MIN_WORDS` words are dropped, and repeated documents are
kept once.

Split and order
---------------
A document goes to ``"validation"`` when the first 8 hex digits of the SHA-256 of its text
are, as an integer, ``< VALIDATION_FRACTION * 16**8`` (about 5%), else to ``"train"``; so a
document's split depends on its text only (not on file order, on the other documents or on
the Python version). Documents are ordered by that hash within each split.

Size
----
On CPython 3.11-3.13 the corpus has about 5,900 documents and 1.7 million characters
(about 1.3 M from docstrings and 0.45 M from the help topics), about 5% of them in
``"validation"``; exact counts vary a little between Python versions. It is built in two
to three seconds.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
import tokenize

from efficient_nlp.data.builtin import _docstrings, _source_files

__all__ = ["MODULES", "SPLITS", "MIN_WORDS", "VALIDATION_FRACTION", "clean_document", "split_of",
           "builtin_corpus", "corpus_stats"]

SPLITS = ("train", "validation")
MIN_WORDS = 3
VALIDATION_FRACTION = 0.05

# Modules and packages with Python sources on CPython 3.11, 3.12 and 3.13 in the usual builds
# (none removed by PEP 594 or moved to separate distro packages such as tkinter and idlelib).
MODULES: tuple[str, ...] = tuple("""
    __future__ _collections_abc _compat_pickle _markupbase _osx_support _pydecimal _pyio
    _strptime _threading_local _weakrefset abc argparse ast asyncio base64 bdb bisect bz2
    cProfile calendar cmd code codecs codeop collections colorsys compileall concurrent
    configparser contextlib copy copyreg csv ctypes curses dataclasses datetime dbm difflib dis
    doctest email encodings enum filecmp fileinput fnmatch fractions ftplib functools
    genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac html http imaplib
    importlib inspect io ipaddress json keyword linecache locale logging lzma mailbox mimetypes
    modulefinder multiprocessing netrc ntpath numbers opcode operator optparse os pathlib pdb
    pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats pty
    py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets
    selectors shelve shlex shutil signal site smtplib socket socketserver sqlite3 ssl stat
    statistics string stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile
    textwrap threading timeit token tokenize tomllib trace traceback tracemalloc tty types
    typing unittest urllib uuid venv warnings wave weakref webbrowser wsgiref xml xmlrpc zipapp
    zipfile zipimport zoneinfo
""".split())

_BLANK_RE = re.compile(r"\n[ \t]*\n")
_UNDERLINE_RE = re.compile(r"([*=\-~^])\1+")


def clean_document(text: str) -> str:
    """Paragraphs of ``text`` (split at blank lines), prose reflowed, code kept, joined by newlines."""
    out = []
    for para in _BLANK_RE.split(text.expandtabs(8).strip("\n")):
        lines = [ln.rstrip() for ln in para.split("\n") if not _UNDERLINE_RE.fullmatch(ln.strip())]
        lines = [ln for ln in lines if ln]
        if not lines:
            continue
        if any(ln[0].isspace() or ln.startswith(">>>") for ln in lines):
            out.extend(lines)
        else:
            out.append(" ".join(" ".join(lines).split()))
    return "\n".join(out)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_of(text: str) -> str:
    """'validation' or 'train', from the SHA-256 of the (cleaned) document text alone."""
    return "validation" if int(_hash(text)[:8], 16) < VALIDATION_FRACTION * 16**8 else "train"


def _topics() -> list[str]:
    """The help topics of ``pydoc_data.topics`` (a dict literal of strings), read with ast."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or not spec.origin:
        return []
    with tokenize.open(spec.origin) as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k] for k in sorted(topics) if isinstance(topics[k], str)]
    return []


@functools.lru_cache(maxsize=1)
def _build() -> tuple[dict[str, tuple[str, ...]], int, int]:
    raw: list[str] = []
    missing = 0
    for module in MODULES:
        try:
            files = _source_files(module)
        except (RuntimeError, ImportError, ValueError):
            missing += 1
            continue
        for path in files:
            raw.extend(_docstrings(path))
    topics = _topics()
    raw.extend(topics)
    docs = {clean_document(t) for t in raw}
    keyed = sorted((_hash(d), d) for d in docs if len(d.split()) >= MIN_WORDS)
    splits = {s: tuple(d for _, d in keyed if split_of(d) == s) for s in SPLITS}
    return splits, missing, len(topics)


def builtin_corpus(split: str) -> list[str]:
    """The documents of ``split`` ("train" or "validation"), ordered by the hash of their text."""
    if split not in SPLITS:
        raise ValueError(f"the built-in corpus has splits {SPLITS}, not {split!r}")
    return list(_build()[0][split])


def corpus_stats() -> dict:
    """``{split: {"documents": n, "characters": c}}`` for both splits, plus ``"topics"`` (help
    topics read) and ``"missing_modules"`` (modules of :data:`MODULES` absent from this Python)."""
    splits, missing, topics = _build()
    out: dict = {s: {"documents": len(d), "characters": sum(map(len, d))} for s, d in splits.items()}
    out["topics"] = topics
    out["missing_modules"] = missing
    return out
