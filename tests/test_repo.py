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
