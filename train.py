"""Command-line entry point: dispatch a config to its recipe.

    python train.py --config configs/quickstart.py --workdir runs/quickstart
    python train.py --config configs/finetune.py --workdir runs/sst2 \
        --config.data.task=sst2 --config.data.data_dir=/data/glue/SST-2

Every ``--config.<key>=<value>`` overrides a field of the config's ``get_config()``;
an unknown key is an error (the config is locked).
"""
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Our progress at INFO; libraries (orbax, jax) only from WARNING on.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("efficient_nlp").setLevel(logging.INFO)
    from efficient_nlp.recipes import run_recipe

    run_recipe(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
