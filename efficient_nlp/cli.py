"""The command line of ``train.py``: flags, usage, the start line, friendly errors, the list of
what a run wrote.

``train.py`` defines the flags and hands over to absl::

    cli.define_flags()
    app.run(cli.main, flags_parser=cli.parse_flags)

Exit status: 0 done; 2 a user error (a flag, the config, the data, a model directory, a
checkpoint, a diverged loss), printed as one line ``error: ...``; 1 a bug (an unexpected
exception: its traceback, then a line asking to report it); 130 interrupted (Ctrl-C, or SIGTERM
during training), with the command that resumes.  ``--debug`` lets every error propagate with
its full traceback (absl's ``--pdb_post_mortem`` then opens the debugger).
"""
from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shlex
import sys
import traceback

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

#: ``(key, meaning)`` of the config fields most runs change, listed by ``--help``.
COMMON_CONFIG_KEYS = (
    ("model_dir", 'pretrained HF directory or hub name ("" = MiniLM-L6-H384)'),
    ("teacher_dir", 'fine-tuned teacher to compress ("" = fine-tune one first)'),
    ("data.task", "GLUE task (sst2, mnli, ...), builtin, or files (your data)"),
    ("data.data_dir", "directory of a GLUE task's files"),
    ("data.train_file", "your training file (.csv, .tsv, .jsonl or .parquet)"),
    ("data.dev_file", "your dev file (same format)"),
    ("data.text_a", "column of the text (the first text of a pair)"),
    ("data.text_b", 'column of the second text of a pair ("" = none)'),
    ("data.label", "column of the label (class ids or names)"),
    ("data.num_labels", "0 = from the task or the labels; 1 = regression"),
    ("data.max_length", "tokens per example (longer texts are truncated)"),
    ("train.num_steps", "optimizer steps"),
    ("train.batch_size", "global batch size"),
    ("train.learning_rate", "peak learning rate (warm-up, then linear decay)"),
    ("train.eval_every", "evaluate every N steps (0 = at the end only)"),
    ("train.checkpoint_every", "checkpoint every N steps (0 = at the end only)"),
    ("train.keep_checkpoints", "newest N checkpoints kept (0 = all)"),
    ("train.resume", "continue from the newest checkpoint in --workdir"),
)

_HELP_ARGS = {"-h", "-help", "--help", "-helpshort", "--helpshort", "-?"}
_USER_STATUS, _BUG_STATUS, _INTERRUPTED_STATUS = 2, 1, 130


class ConfigError(ValueError):
    """A flag or config problem found before the recipe runs (the message names the fix)."""


def usage() -> str:
    """The text of ``--help``."""
    width = max(len(key) for key, _ in COMMON_CONFIG_KEYS) + len("--config.") + 2
    keys = "\n".join(f"  {'--config.' + key:<{width}}{meaning}" for key, meaning in COMMON_CONFIG_KEYS)
    return rf"""Fine-tune or compress a model: runs the recipe named in a config file.

usage: python train.py --config CONFIG.py --workdir DIR [--config.KEY=VALUE ...] [--debug]

examples:
  python train.py --config configs/quickstart.py --workdir runs/quickstart
  python train.py --config configs/finetune.py --workdir runs/sst2 \
      --config.data.task=sst2 --config.data.data_dir=/data/glue/SST-2

Each --config.KEY=VALUE overrides one field of the config file's get_config(); KEY is the
field's dotted path (--config.train.num_steps=500; booleans also as --config.train.resume /
--noconfig.train.resume).  An unknown key or a value of the wrong type is an error.  Each config
file's docstring describes its recipe and fields; docs/finetuning.md the fine-tuning ones.
Running the same command again resumes from the newest checkpoint in --workdir.

flags:
  --config CONFIG.py   a config file that defines get_config() (see configs/)
  --workdir DIR        where the checkpoints, metrics, model and results.json are written
  --debug              show the full traceback of an error (else one line: error: ...)

common config keys (a config has those its recipe reads):
{keys}

exit status: 0 done, 2 a user error (flag, config, data, model or checkpoint), 1 a bug
(traceback shown), 130 interrupted.  --helpfull also lists absl's own flags.
"""


def define_flags(flag_values=flags.FLAGS, argv=None):
    """Defines ``--config`` (a config file, locked: unknown keys are errors), ``--workdir`` and
    ``--debug`` on ``flag_values``; ``argv`` is where the config overrides are looked for (default
    ``sys.argv`` at parse time)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, the model and results.",
                        flag_values=flag_values)
    flags.DEFINE_boolean("debug", False, "Show the full traceback of an error.", flag_values=flag_values)


# ----------------------------------------------------------------------------- flag parsing
def parse_flags(argv, flag_values=flags.FLAGS):
    """absl ``flags_parser``: parses ``argv`` into ``flag_values`` and returns the arguments left.

    ``--help`` prints `usage` and exits 0.  A bad flag or config (a missing config file, one
    without ``get_config``, an unknown key, a value of the wrong type, a missing ``--config`` or
    ``--workdir``) prints one line ``error: ...`` and exits 2 (with ``--debug``: raises).
    """
    if any(arg in _HELP_ARGS for arg in _before_terminator(argv)):
        sys.stdout.write(usage())
        raise SystemExit(0)
    try:
        try:
            config = check_config_args(flag_values.read_flags_from_files(argv, force_gnu=False))
            rest = flag_values(argv)
        except flags.Error as error:
            raise ConfigError(flag_error_message(error, config)) from error
        for name, fix in (("config", "a config file, e.g. --config configs/quickstart.py"),
                          ("workdir", "the directory for its outputs, e.g. --workdir runs/quickstart")):
            if flag_values[name].value is None:
                raise ConfigError(f"missing --{name}: give {fix} (see --help)")
    except ConfigError as error:
        if any(re.fullmatch(r"--?debug(=(true|t|1))?", arg, re.I) for arg in _before_terminator(argv)):
            raise
        _print_error(str(error))
        raise SystemExit(_USER_STATUS) from None
    return rest


def _before_terminator(argv):
    args = list(argv[1:])
    return args[:args.index("--")] if "--" in args else args


def check_config_args(argv):
    """The config of ``--config`` in ``argv``, after checking that the file exists and defines
    ``get_config`` and that every ``--config.KEY`` override names an existing field; None when
    ``argv`` has no ``--config``.  Raises `ConfigError` naming the problem and the fix."""
    args = _before_terminator(argv)
    value = None
    for i, arg in enumerate(args):
        if re.fullmatch(r"--?config", arg) and i + 1 < len(args):
            value = args[i + 1]
        elif re.match(r"--?config=", arg):
            value = arg.split("=", 1)[1]
    if value is None:
        return None
    path, *config_args = value.split(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (give a .py file that defines get_config(), "
                          "e.g. --config configs/quickstart.py)")
    loader = importlib.machinery.SourceFileLoader("_efficient_nlp_cli_config", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} defines no get_config() function")
    config = module.get_config(*config_args)
    for arg in args:
        if re.match(r"--?(no)?config\.", arg):
            _lookup(config, arg.split("=", 1)[0].split(".", 1)[1])
    return config


def _lookup(config, key):
    """The value of the dotted ``key`` in ``config``; `ConfigError` for an unknown key, with the
    closest existing one.  Indexed parts (``stages[0]``) are not checked (None is returned)."""
    node, done = config, []
    for part in key.split("."):
        if "[" in part:
            return None
        if not hasattr(node, "keys"):
            raise ConfigError(f"config key '{'.'.join(done)}' holds a {type(node).__name__}, which has "
                              f"no field '{part}'")
        if part not in node:
            prefix = "".join(f"{p}." for p in done)
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = (f"did you mean '{prefix}{close[0]}'?" if close else
                    f"{'config.' + '.'.join(done) if done else 'the config'} has: {', '.join(node.keys())}")
            raise ConfigError(f"unknown config key '{prefix}{part}' ({hint})")
        node = node[part]
        done.append(part)
    return node


def flag_error_message(error, config=None) -> str:
    """One line for an absl flag error: an unknown flag with absl's suggestion, or a config value
    of the wrong type with the type it must have (from ``config``)."""
    text = str(error)
    if isinstance(error, flags.UnrecognizedFlagError):
        close = re.search(r"Did you mean: (.*) \?$", text)
        tip = f" (did you mean --{' or --'.join(close.group(1).split(', '))}?)" if close else ""
        return f"unknown flag --{error.flagname}{tip}; see --help"
    match = re.match(r"flag --config\.([^=]+)=(.*?): ", text, re.S)
    if match and config is not None:
        key, value = match.groups()
        current = _lookup(config, key)
        if current is not None:
            kind = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "str": "a string"}.get(type(current).__name__, f"a {type(current).__name__}")
            return f"bad value {value!r} for config key '{key}': expected {kind} (like the config's {current!r})"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


# ----------------------------------------------------------------------------- the run
def main(argv, flag_values=flags.FLAGS):
    """absl ``main``: prints the start line, runs the recipe of ``--config`` in ``--workdir`` and
    lists what it wrote; returns the exit status (see the module docstring)."""
    if len(argv) > 1:
        _print_error(f"unexpected arguments {argv[1:]}: flags take the form --name=value (see --help)")
        return _USER_STATUS
    config, workdir = flag_values.config, flag_values.workdir
    configure_logging()
    try:
        from efficient_nlp import train as train_lib
        from efficient_nlp.recipes import run_recipe

        train_lib.init_distributed(config)
        main_process = train_lib.is_main_process()
        if main_process:
            print(start_line(config, workdir), flush=True)
        run_recipe(config, workdir)
    except KeyboardInterrupt as interrupt:
        print(interrupt_message(interrupt, workdir, sys.argv), file=sys.stderr, flush=True)
        return _INTERRUPTED_STATUS
    except Exception as error:
        if flag_values.debug:
            raise
        if is_user_error(error):
            _print_error(error_message(error))
            return _USER_STATUS
        traceback.print_exc()
        _print_error(f"an unexpected {type(error).__name__}: this is a bug in efficient_nlp; please "
                     "report it with the traceback above and the command you ran")
        return _BUG_STATUS
    if main_process and os.path.isdir(workdir):
        print(wrote(workdir), flush=True)
    return 0


def configure_logging():
    """Our progress at INFO; libraries (orbax, jax) only from WARNING on; stdout written line by
    line even into a file or a pipe (so a log shows each line when it is printed)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    logger = logging.getLogger("efficient_nlp")
    if not any(isinstance(h, _PlainHandler) for h in logger.handlers):
        logger.addHandler(_PlainHandler())
        logger.propagate = False   # not also through absl's handler (time, thread id, file:line)


class _PlainHandler(logging.StreamHandler):
    """Our log records on stderr as plain lines (``warning: `` before warnings and errors)."""

    @property
    def stream(self):  # the current sys.stderr (notebooks and test runners replace it)
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def format(self, record):
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("efficient_nlp").setLevel(logging.INFO)


def _print_error(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


def is_user_error(error) -> bool:
    """Whether ``error`` is the user's to fix (a value, a path, a checkpoint, a diverged loss),
    shown as one line, rather than a bug."""
    from efficient_nlp.train import CheckpointError, NonFiniteLossError

    return isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                              CheckpointError, NonFiniteLossError))


def error_message(error) -> str:
    """The message of a user error; OS errors as ``reason: path``."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    return str(error) or type(error).__name__


def interrupt_message(interrupt, workdir, command) -> str:
    """Where an interrupted run stopped (``interrupt.step`` / ``.checkpoint`` when training set
    them) and the command that resumes it: ``command`` (``sys.argv``) again, shell-quoted."""
    step, checkpoint = getattr(interrupt, "step", None), getattr(interrupt, "checkpoint", None)
    if step is None:
        where = f"interrupted; a rerun continues from the newest checkpoint in {workdir}, if any"
    elif checkpoint:
        where = f"interrupted at step {step}; checkpoint saved in {checkpoint}"
    else:
        where = f"interrupted at step {step}; no checkpoint saved"
    return f"{where}\nresume with: {resume_command(command)}"


def resume_command(command) -> str:
    """``command`` (an argv) as one shell-quoted line, run by this Python when it is a script."""
    prefix = [os.path.basename(sys.executable) or "python"] if command[0].endswith(".py") else []
    return shlex.join(prefix + list(command))


# ----------------------------------------------------------------------------- start and end lines
def start_line(config, workdir) -> str:
    """``recipe | model ... | task ... | N platform devices | workdir /abs/path``."""
    import jax

    count = jax.device_count()
    devices = f"{count} {jax.devices()[0].platform} device{'s' if count != 1 else ''}"
    if jax.process_count() > 1:
        devices += f" on {jax.process_count()} hosts"
    parts = [config.get("recipe"), describe_model(config), describe_task(config), devices,
             f"workdir {os.path.abspath(workdir)}"]
    return " | ".join(p for p in parts if p)


def describe_model(config) -> str | None:
    """The model a run starts from: the teacher when given, else ``model_dir`` (its default
    named); None for configs without one."""
    if config.get("teacher_dir"):
        return f"teacher {config.teacher_dir}"
    if "model_dir" not in config:
        return None
    name = config.model_dir
    if config.get("recipe") == "causal_lm":
        name = {"": "new decoder (trained from scratch)", "default": "default decoder"}.get(name, name)
    elif not name:
        task = config.data.get("task") if "data" in config else None
        name = "default decoder" if task == "lm" else "embedded MiniLM-L6-H384"
    return f"model {name}"


def describe_task(config) -> str | None:
    """``task NAME (where its data is)``: the train file, the data directory or the text source."""
    data = config.get("data")
    if data is None:
        return None
    task = data.get("task") or ("lm" if config.get("recipe") == "causal_lm" else "")
    where = data.get("train_file") or data.get("data_dir") or data.get("source")
    return f"task {task}" + (f" ({where})" if where else "")


def human_size(num_bytes) -> str:
    """Decimal units, three significant digits: ``188 B``, ``2.1 kB``, ``87.6 MB``, ``331 MB``."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        text = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"
        if float(text) < 1000 or unit == "TB":
            return f"{text} {unit}"


def tree_size(path) -> int:
    """Bytes of the files under ``path`` (symbolic links not followed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(root, name)).st_size
               for root, _, files in os.walk(path) for name in files)


def wrote(workdir) -> str:
    """``wrote: DIR`` and one line per top-level entry with its size (directories summed; the
    number of steps kept in ``checkpoints/``)."""
    rows = []
    for entry in sorted(os.scandir(workdir), key=lambda e: e.name):
        is_dir = entry.is_dir(follow_symlinks=False)
        note = ""
        if is_dir and entry.name == "checkpoints":
            steps = sum(1 for e in os.scandir(entry.path) if e.is_dir() and e.name.isdigit())
            note = f" ({steps} step{'s' if steps != 1 else ''} kept)"
        rows.append((entry.name + ("/" if is_dir else ""), human_size(tree_size(entry.path)) + note))
    width = max((len(name) for name, _ in rows), default=0) + 2
    return "\n".join([f"wrote: {os.path.abspath(workdir)}"] + [f"  {n:<{width}}{s}" for n, s in rows])
