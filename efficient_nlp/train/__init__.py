"""Training: the one loop (``fit``), optimizer, mesh/multi-host, checkpoints, metrics.

    from efficient_nlp import train
    train.init_distributed(config)          # first, before other JAX calls (multi-host)
    model, history = train.fit(model, loss_fn, batches, config=config, workdir=workdir,
                               eval_fn=eval_fn)

``config.train`` keys and defaults: ``default_train_config()``; ``config.distributed``:
``default_distributed_config()``.
"""
from efficient_nlp.train.checkpoint import (
    CheckpointError,
    Checkpointer,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from efficient_nlp.train.distributed import (
    DATA_AXIS,
    batch_sharding,
    default_distributed_config,
    init_distributed,
    is_main_process,
    make_mesh,
    replicate,
    replicated,
    scalars_to_host,
    shard_batch,
    to_host,
)
from efficient_nlp.train.loop import (
    NonFiniteLossError,
    StepRunner,
    TrainOptions,
    TrainState,
    default_train_config,
    fit,
    make_step_runner,
    train_options,
    train_step,
)
from efficient_nlp.train.metrics import MetricsWriter, read_metrics
from efficient_nlp.train.optim import (
    make_lr_schedule,
    make_optimizer,
    weight_decay_mask,
)

from efficient_nlp.train.evaluate import make_eval_fn, predict

__all__ = [
    "CheckpointError", "Checkpointer", "CorruptCheckpointError", "DATA_AXIS",
    "IncompatibleCheckpointError", "MetricsWriter", "NonFiniteLossError", "StepRunner",
    "TrainOptions", "TrainState", "batch_sharding", "default_distributed_config",
    "default_train_config", "fit", "init_distributed", "is_main_process",
    "make_eval_fn", "make_lr_schedule", "make_mesh", "make_optimizer", "make_step_runner",
    "predict", "read_metrics", "replicate", "replicated", "scalars_to_host", "shard_batch",
    "to_host", "train_options", "train_step", "weight_decay_mask",
]
