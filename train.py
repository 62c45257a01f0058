"""Command-line entry point: runs the recipe of a config file (``python train.py --help``).

    python train.py --config configs/quickstart.py --workdir runs/quickstart

The flags, the messages and the exit status are in ``efficient_nlp.cli``.
"""
from absl import app

from efficient_nlp import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main, flags_parser=cli.parse_flags)
