"""Every name the docs pages mention exists: ``efficient_nlp.<...>`` dotted names resolve to an
importable module or attribute, and every repository path (``configs/*.py``, ``tests/*.py``
with an optional ``::test``, ``benchmarks/*.py``, ``efficient_nlp/**/*.py``) is a file (with that
test in it).  One test per page, so a failure names the page."""
import glob
import importlib
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOTTED = re.compile(r"\befficient_nlp(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"\b((?:configs|tests|benchmarks|efficient_nlp)/[\w/{},*.]*?\.py)(?:::(\w+))?")


def resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:i]).startswith(e.name):
                raise  # the module exists but one of its imports is missing
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def expand(path: str) -> list[str]:
    """Brace alternatives (``qat_{8_8_8,4_4_8}.py``) expanded; globs matched in the checkout."""
    pieces = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(pieces)]
    out = []
    for combo in itertools.product(*choices):
        candidate = "".join(combo)
        if "*" in candidate:
            matches = glob.glob(os.path.join(ROOT, candidate))
            out += [os.path.relpath(m, ROOT) for m in matches] or [candidate]
        else:
            out.append(candidate)
    return out


def missing_names(text: str) -> list[str]:
    bad = []
    for name in sorted(set(DOTTED.findall(text))):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            bad.append(f"{name} ({type(e).__name__}: {e})")
    for path, test in sorted(set(PATH.findall(text))):
        for p in expand(path):
            full = os.path.join(ROOT, p)
            if not os.path.isfile(full):
                bad.append(f"{p} (no such file)")
            elif test and not re.search(rf"^(async )?def {test}\(", open(full).read(), re.M):
                bad.append(f"{p}::{test} (no such test)")
    return bad


def test_the_checker_catches_wrong_names():
    text = ("`efficient_nlp.prune.no_such_function`, `efficient_nlp.no_such_module.x`, "
            "`configs/no_such_config.py`, `tests/test_docs.py::test_no_such_test`, "
            "`configs/qat_{2_2_8,9_9_9}.py`, and the good `efficient_nlp.prune.rule`, "
            "`efficient_nlp.quant.spec.register_quantizer`, `configs/prune_movement.py:0.9`.")
    bad = missing_names(text)
    assert [b.split(" ")[0] for b in bad] == [
        "efficient_nlp.no_such_module.x", "efficient_nlp.prune.no_such_function",
        "configs/no_such_config.py", "configs/qat_9_9_9.py", "tests/test_docs.py::test_no_such_test"]


@pytest.mark.parametrize("page", [os.path.relpath(p, ROOT) for p in PAGES])
def test_every_name_a_docs_page_mentions_exists(page):
    with open(os.path.join(ROOT, page)) as f:
        bad = missing_names(f.read())
    assert not bad, f"{page} mentions names that do not exist:\n" + "\n".join(bad)
