"""Training and evaluation primitives: the one step (``make_step``), the loop with checkpoints
(``fit``), short loops (``run``), prediction (``predict``), latency, optimizer, mesh/multi-host,
checkpoints, metrics.

    from efficient_nlp import train
    train.init_distributed(config)          # first, before other JAX calls (multi-host)
    model, history = train.fit(model, loss_fn, batches, config=config, workdir=workdir,
                               eval_fn=eval_fn)
    model, history = train.run(model, loss_fn, optax.adam(1e-3), batches, steps=200)
    logits = train.predict(model, dev_arrays, batch_size=128)
    with train.Meter(config) as meter:      # FLOPs, throughput, MFU, energy, CO2 of what runs inside
        ...
    print(train.format_summary(meter.summary()))

Sharding of the training state on a (``data``, ``model``) mesh (``config.train.mesh``,
``config.train.sharding``: data parallel, FSDP, tensor parallel or rules): `sharding`.

``config.train`` keys and defaults: ``default_train_config()``; ``config.distributed``:
``default_distributed_config()``; ``config.compute``: ``compute.default_compute_config()``.
"""
from efficient_nlp.train.checkpoint import (
    CheckpointError,
    Checkpointer,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from efficient_nlp.train.distributed import (
    DATA_AXIS,
    MODEL_AXIS,
    batch_sharding,
    default_distributed_config,
    init_distributed,
    is_main_process,
    make_mesh,
    place,
    put,
    replicate,
    replicated,
    scalars_to_host,
    shard_batch,
    to_host,
)
from efficient_nlp.train.loop import (
    StepRunner,
    TrainOptions,
    TrainingInterrupted,
    default_train_config,
    fit,
    make_step_runner,
    train_options,
)
from efficient_nlp.train import compute, sharding
from efficient_nlp.train.compute import Meter, format_summary
from efficient_nlp.train.sharding import ShardingError, shard_state
from efficient_nlp.train.step import (
    NonFiniteLossError,
    Progress,
    TrainState,
    check_opt_state,
    compiled_step,
    copy_model,
    init_state,
    make_step,
    mean_metrics,
    run,
)
from efficient_nlp.train.metrics import MetricsWriter, read_metrics
from efficient_nlp.train.optim import (
    make_lr_schedule,
    make_optimizer,
    weight_decay_mask,
)

from efficient_nlp.train.evaluate import make_eval_fn, predict, predict_logits
from efficient_nlp.train.latency import compare_latency, measure_latency, token_batch
from efficient_nlp.train.memory import count_params, step_memory, tree_bytes

__all__ = [
    "CheckpointError", "Checkpointer", "CorruptCheckpointError", "DATA_AXIS",
    "IncompatibleCheckpointError", "MODEL_AXIS", "Meter", "MetricsWriter", "NonFiniteLossError", "Progress", "StepRunner",
    "TrainOptions", "TrainingInterrupted", "TrainState", "batch_sharding", "check_opt_state", "compare_latency", "compiled_step", "compute", "copy_model", "count_params",
    "default_distributed_config", "default_train_config", "fit", "format_summary", "init_distributed", "init_state",
    "is_main_process", "make_eval_fn", "make_lr_schedule", "make_mesh", "make_optimizer", "make_step",
    "make_step_runner", "mean_metrics", "measure_latency", "place", "predict", "put", "predict_logits", "read_metrics",
    "ShardingError", "replicate", "replicated", "run", "scalars_to_host", "shard_batch", "shard_state", "sharding", "step_memory", "to_host", "token_batch",
    "train_options", "tree_bytes", "weight_decay_mask",
]
