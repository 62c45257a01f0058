"""The command line (efficient_nlp/cli.py behind train.py): one line per user error, tracebacks
only for bugs or with --debug, the resume command after an interrupt, the start line, the list of
what a run wrote and a --help that names only existing config keys."""
import os
import re
import shlex
import subprocess
import sys

import jax
import pytest
from absl import flags
from absl import logging as absl_logging

from efficient_nlp import cli
from efficient_nlp import recipes
from efficient_nlp import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is importable from the repository root

from configs import finetune, qat_4_4_8  # noqa: E402

QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


@pytest.fixture(autouse=True)
def _restore_logging():
    """``cli.main`` sets the log levels of a run; put them back for the other tests."""
    logger = cli.logging.getLogger("efficient_nlp")
    verbosity = absl_logging.get_verbosity()
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    absl_logging.set_verbosity(verbosity)
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate      # caplog in later tests listens at the root logger


def run_cli(monkeypatch, *args):
    """``python train.py ARGS`` in-process (its own flag registry): the exit status."""
    argv = ["train.py", *args]
    monkeypatch.setattr(sys, "argv", argv)
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values, argv)
    try:
        rest = cli.parse_flags(argv, flag_values)
    except SystemExit as exit_:
        return exit_.code
    return cli.main(rest, flag_values)


def quickstart_args(workdir, *overrides):
    return ("--config", QUICKSTART, "--workdir", str(workdir), *overrides)


def recipe_raising(error):
    def run_recipe(config, workdir):
        raise error
    return run_recipe


# ----------------------------------------------------------------------------- flag and config errors
@pytest.mark.parametrize("override, message", [
    ("--config.data.tsk=a", "unknown config key 'data.tsk' (did you mean 'data.task'?)"),
    ("--config.trian.num_steps=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ("--config.recipe.name=x", "config key 'recipe' holds a str, which has no field 'name'"),
    ("--config.train.num_steps=abc",
     "bad value 'abc' for config key 'train.num_steps': expected an integer (like the config's 300)"),
    ("--config.train.resume=maybe",
     "bad value 'maybe' for config key 'train.resume': expected true or false (like the config's True)"),
    ("--wrokdir=x", "unknown flag --wrokdir (did you mean --workdir?); see --help"),
])
def test_a_bad_flag_or_config_key_is_one_line_naming_the_fix(monkeypatch, capsys, tmp_path, override, message):
    assert run_cli(monkeypatch, *quickstart_args(tmp_path, override)) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {message}\n")


def test_an_unknown_key_without_a_close_match_lists_the_section(monkeypatch, capsys, tmp_path):
    assert run_cli(monkeypatch, *quickstart_args(tmp_path, "--config.data.zzz=1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'data.zzz' (config.data has: data_dir, dev_file, label, ")
    assert err.count("\n") == 1


def test_overrides_in_a_flagfile_are_checked_too(monkeypatch, capsys, tmp_path):
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--config.train.num_stepz=3\n")
    assert run_cli(monkeypatch, *quickstart_args(tmp_path, f"--flagfile={flagfile}")) == 2
    assert capsys.readouterr().err == "error: unknown config key 'train.num_stepz' (did you mean 'train.num_steps'?)\n"


def test_a_missing_config_file_or_one_without_get_config_is_one_line(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "nope.py")
    assert run_cli(monkeypatch, "--config", missing, "--workdir", str(tmp_path)) == 2
    assert capsys.readouterr().err == (
        f"error: config file not found: {missing} (give a .py file that defines get_config(), "
        "e.g. --config configs/quickstart.py)\n")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    assert run_cli(monkeypatch, f"--config={empty}", "--workdir", str(tmp_path), "--config.x=1") == 2
    assert capsys.readouterr().err == f"error: config file {empty} defines no get_config() function\n"


@pytest.mark.parametrize("args, message", [
    (("--config", QUICKSTART), "missing --workdir: give the directory for its outputs, e.g. "
                               "--workdir runs/quickstart (see --help)"),
    (("--workdir", "runs/x"), "missing --config: give a config file, e.g. --config configs/quickstart.py "
                              "(see --help)"),
])
def test_a_missing_required_flag_is_one_line(monkeypatch, capsys, args, message):
    assert run_cli(monkeypatch, *args) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_debug_lets_a_config_error_propagate(monkeypatch, capsys, tmp_path):
    with pytest.raises(cli.ConfigError, match=r"did you mean 'data.task'"):
        run_cli(monkeypatch, *quickstart_args(tmp_path, "--config.data.tsk=a", "--debug"))
    assert "error:" not in capsys.readouterr().err


def test_the_config_typo_through_train_py_is_one_line_and_status_2(tmp_path):
    """The real entry point (absl's app.run, global flags): the typo is caught while parsing."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config", QUICKSTART,
                           "--workdir", str(tmp_path), "--config.data.tsk=a"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown config key 'data.tsk' (did you mean 'data.task'?)\n"
    assert "Traceback" not in proc.stderr and "\\n" not in proc.stderr


# ----------------------------------------------------------------------------- errors of the run
def start_line(workdir, recipe="finetune"):
    count = jax.device_count()
    devices = f"{count} {jax.devices()[0].platform} device{'s' if count != 1 else ''}"
    return f"{recipe} | model embedded MiniLM-L6-H384 | task builtin | {devices} | workdir {workdir}"


def test_an_unknown_recipe_is_one_line_after_the_start_line(monkeypatch, capsys, tmp_path):
    assert run_cli(monkeypatch, *quickstart_args(tmp_path, "--config.recipe=nope")) == 2
    out, err = capsys.readouterr()
    assert out == start_line(tmp_path, recipe="nope") + "\n"
    assert err.startswith("error: Unknown recipe 'nope' in config.recipe; known recipes: ['binarybert',")
    assert err.count("\n") == 1


@pytest.mark.parametrize("error, message", [
    (ValueError("data.label='y' is not a column of train.csv; columns: text, label"),
     "data.label='y' is not a column of train.csv; columns: text, label"),
    (FileNotFoundError("tokenizer directory not found: /data/none"), "tokenizer directory not found: /data/none"),
    (FileNotFoundError(2, "No such file or directory", "data/train.csv"), "No such file or directory: data/train.csv"),
    (NotADirectoryError(20, "Not a directory", "data/x"), "Not a directory: data/x"),
    (IsADirectoryError(21, "Is a directory", "data"), "Is a directory: data"),
    (train.CorruptCheckpointError("runs/x/checkpoints/4", "truncated"),
     "Cannot restore checkpoint runs/x/checkpoints/4: truncated"),
    (train.NonFiniteLossError(7, "non-finite loss at step 7; lower the learning rate"),
     "non-finite loss at step 7; lower the learning rate"),
])
def test_a_user_error_of_the_run_is_one_line_and_status_2(monkeypatch, capsys, tmp_path, error, message):
    monkeypatch.setattr(recipes, "run_recipe", recipe_raising(error))
    assert run_cli(monkeypatch, *quickstart_args(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out == start_line(tmp_path) + "\n"
    assert err == f"error: {message}\n"


def test_debug_lets_a_user_error_of_the_run_propagate(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(recipes, "run_recipe", recipe_raising(ValueError("bad value")))
    with pytest.raises(ValueError, match="bad value"):
        run_cli(monkeypatch, *quickstart_args(tmp_path, "--debug"))
    assert "error:" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(recipes, "run_recipe", recipe_raising(TypeError("unsupported operand")))
    assert run_cli(monkeypatch, *quickstart_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith("TypeError: unsupported operand\nerror: an unexpected TypeError: this is a bug in "
                        "efficient_nlp; please report it with the traceback above and the command you ran\n")


# ----------------------------------------------------------------------------- interrupts
def test_an_interrupt_in_training_prints_the_step_and_the_resume_command(monkeypatch, capsys, tmp_path):
    interrupted = getattr(train, "TrainingInterrupted", None)
    if interrupted is None:  # the attributes are what the CLI reads
        class interrupted(KeyboardInterrupt):
            def __init__(self, step, checkpoint):
                self.step, self.checkpoint = step, checkpoint
    checkpoint = str(tmp_path / "checkpoints" / "40")
    monkeypatch.setattr(recipes, "run_recipe", recipe_raising(interrupted(40, checkpoint)))
    args = quickstart_args(tmp_path, "--config.data.text_a=review text")
    assert run_cli(monkeypatch, *args) == 130
    command = shlex.join([os.path.basename(sys.executable), "train.py", *args])
    assert capsys.readouterr().err == (f"interrupted at step 40; checkpoint saved in {checkpoint}\n"
                                       f"resume with: {command}\n")
    assert "'--config.data.text_a=review text'" in command  # quoted for the shell


def test_a_plain_interrupt_prints_the_resume_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(recipes, "run_recipe", recipe_raising(KeyboardInterrupt()))
    args = quickstart_args(tmp_path)
    assert run_cli(monkeypatch, *args) == 130
    command = shlex.join([os.path.basename(sys.executable), "train.py", *args])
    assert capsys.readouterr().err == (
        f"interrupted; a rerun continues from the newest checkpoint in {tmp_path}, if any\n"
        f"resume with: {command}\n")


# ----------------------------------------------------------------------------- start and end lines
def test_a_run_prints_the_start_line_then_what_it_wrote(monkeypatch, capsys, tmp_path):
    def run_recipe(config, workdir):
        with open(os.path.join(workdir, "results.json"), "w") as f:
            f.write("{}" + " " * 98)
        return {}
    monkeypatch.setattr(recipes, "run_recipe", run_recipe)
    assert run_cli(monkeypatch, *quickstart_args(tmp_path)) == 0
    out, err = capsys.readouterr()
    assert out == f"{start_line(tmp_path)}\nwrote: {tmp_path}\n  results.json  100 B\n"


@pytest.mark.parametrize("overrides, model, task", [
    ({"teacher_dir": "runs/x/model"}, "teacher runs/x/model", "task builtin"),
    ({"model_dir": "runs/base", "data.task": "files", "data.train_file": "my/train.csv"},
     "model runs/base", "task files (my/train.csv)"),
    ({"data.task": "sst2", "data.data_dir": "glue/SST-2"}, "model embedded MiniLM-L6-H384", "task sst2 (glue/SST-2)"),
])
def test_the_start_line_names_the_model_and_the_data(tmp_path, overrides, model, task):
    config = qat_4_4_8.get_config()
    config.update_from_flattened_dict(overrides)
    line = cli.start_line(config, str(tmp_path))
    assert line.split(" | ")[:3] == ["qat", model, task]
    assert line.endswith(f" | workdir {tmp_path}")


def test_the_start_line_of_a_decoder_run_names_the_default_decoder():
    from configs import lm_qat_4_4_8
    config = lm_qat_4_4_8.get_config()
    assert cli.describe_model(config) == "model default decoder"
    assert cli.describe_task(config) == "task lm (builtin)"


@pytest.mark.parametrize("num_bytes, text", [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (2100, "2.1 kB"), (99_940, "99.9 kB"),
    (99_960, "100 kB"), (999_400, "999 kB"), (999_600, "1.0 MB"), (87_600_000, "87.6 MB"),
    (331_000_000, "331 MB"), (4_200_000_000, "4.2 GB"),
])
def test_human_sizes_keep_three_significant_digits(num_bytes, text):
    assert cli.human_size(num_bytes) == text


def test_wrote_sums_directories_and_counts_the_checkpoints_kept(tmp_path):
    for step in ("100", "200", "300"):
        (tmp_path / "checkpoints" / step / "state").mkdir(parents=True)
        (tmp_path / "checkpoints" / step / "state" / "data").write_bytes(b"x" * 1000)
        (tmp_path / "checkpoints" / step / "manifest").write_bytes(b"x" * 100)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"x" * 2000)
    (tmp_path / "model" / "vocab.txt").write_bytes(b"x" * 100)
    (tmp_path / "results.json").write_bytes(b"x" * 188)
    (tmp_path / "teacher" / "checkpoints" / "1").mkdir(parents=True)
    assert cli.wrote(str(tmp_path)) == (f"wrote: {tmp_path}\n"
                                        "  checkpoints/  3.3 kB (3 steps kept)\n"
                                        "  model/        2.1 kB\n"
                                        "  results.json  188 B\n"
                                        "  teacher/      0 B")


# ----------------------------------------------------------------------------- --help
def test_help_prints_the_usage_and_exits_0(monkeypatch, capsys):
    assert run_cli(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    assert out == cli.usage()
    assert "python train.py --config configs/quickstart.py --workdir runs/quickstart\n" in out
    assert ("python train.py --config configs/finetune.py --workdir runs/sst2 \\\n"
            "      --config.data.task=sst2" in out)  # one continuation, then the next line
    assert "--debug" in out and "--workdir DIR" in out


def test_help_lists_only_config_keys_that_exist():
    listed = set(re.findall(r"--(?:no)?config\.([a-z_][a-z0-9_.]*)", cli.usage()))  # not KEY
    assert {key for key, _ in cli.COMMON_CONFIG_KEYS} <= listed
    configs = (finetune.get_config(), qat_4_4_8.get_config())

    def exists(key):
        for config in configs:
            node = config
            for part in key.split("."):
                if not hasattr(node, "keys") or part not in node:
                    break
                node = node[part]
            else:
                return True
        return False

    assert [key for key in sorted(listed) if not exists(key)] == []
    assert exists("teacher_dir") and not exists("data.tsk")  # the check itself can fail
