"""The repository keeps its promises to a new user: README's commands are the ones CI runs."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    main, tests = commands
    assert "train.py --config configs/quickstart.py" in main
    assert "pytest" in tests
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    assert tests in ci.splitlines()


def test_every_config_file_named_in_readme_exists():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    names = set(re.findall(r"configs/\w+\.py", text))
    assert names, "README names no config"
    missing = [n for n in names if not os.path.exists(os.path.join(REPO, n))]
    assert not missing, missing


# What users read: none of it may point at files they do not have (a machine path, the team's
# internal method notes) or at internal work items.
USER_FACING = ("README.md", "CHANGELOG.md", "train.py", "docs", "configs", "benchmarks", "colab",
               "efficient_nlp")
INTERNAL = [
    (re.compile(r"(?<![\w.])/(?:work|home|root|tmp|Users|mnt)/[\w.-]+"), "a machine path"),
    (re.compile(r"\bMETHODS\.md\b|\bDESIGN\.md\b|\.\./shared\b"), "an internal notes file"),
    (re.compile(r"\b(?:issue|ticket)\s*#?\d+\b", re.I), "an internal work item"),
]


def internal_references(text: str) -> list[str]:
    """``"line N: what (text)"`` for every internal reference in ``text``."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pattern, what in INTERNAL:
            for m in pattern.finditer(line):
                found.append(f"line {n}: {what} ({m.group(0)})")
    return found


def user_facing_files():
    for entry in USER_FACING:
        path = os.path.join(REPO, entry)
        if os.path.isfile(path):
            yield entry
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith((".md", ".py", ".ipynb", ".txt", ".json")):
                    yield os.path.relpath(os.path.join(root, name), REPO)


def test_the_scan_catches_internal_references():
    text = ("see /work/main/runs/x and /tmp/y.json\nas in METHODS.md sec. 3 and ../shared/notes\n"
            "fixed in issue 22; and Issue #5\nfine: /data/glue/SST-2, runs/quickstart, tmp_path, "
            "https://arxiv.org/abs/1909.10351, issues of the tracker")
    assert [r.split(" (")[0] for r in internal_references(text)] == [
        "line 1: a machine path", "line 1: a machine path", "line 2: an internal notes file",
        "line 2: an internal notes file", "line 3: an internal work item", "line 3: an internal work item"]


def test_docs_configs_benchmarks_and_code_name_no_internal_references():
    bad = []
    for rel in user_facing_files():
        with open(os.path.join(REPO, rel), encoding="utf-8", errors="replace") as f:
            bad += [f"{rel}: {r}" for r in internal_references(f.read())]
    assert not bad, "user-facing files point at things users do not have:\n" + "\n".join(bad)
