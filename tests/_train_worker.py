"""Tiny model, synthetic data and a subprocess entry point for tests/test_train.py.

The loop is model-agnostic, so its tests use this small NNX classifier (embedding, mean
pool, LayerNorm, hidden layer with dropout, linear head) on token data with a learnable
rule: label = 1 iff more than half the tokens are from the lower half of the vocabulary.

Run as a script (``python tests/_train_worker.py MODE ...``) it trains in a fresh process
and prints one line ``RESULT {json}``:
  devices WORKDIR                      -- all local devices (set XLA_FLAGS before start)
  multihost WORKDIR PORT PID NPROC     -- one process of a jax.distributed run on 127.0.0.1
"""
import json
import os
import sys

import numpy as np

VOCAB, SEQ, DIM = 32, 9, 16


def make_data(seed, index, batch_size, process_index=0, process_count=1, poison_step=None):
    """Global batch ``index`` (a pure function of seed and index), this host's rows."""
    rng = np.random.default_rng([seed, index])
    ids = rng.integers(0, VOCAB, size=(batch_size, SEQ)).astype(np.int32)
    labels = ((ids < VOCAB // 2).sum(1) > SEQ // 2).astype(np.int32)
    poison = np.zeros((batch_size,), np.float32)
    if poison_step is not None and index == poison_step - 1:  # batch of update poison_step
        poison[:] = np.nan
    rows = slice(process_index * batch_size // process_count,
                 (process_index + 1) * batch_size // process_count)
    return {"ids": ids[rows], "labels": labels[rows], "poison": poison[rows]}


def make_batches(batch_size, seed=0, process_index=0, process_count=1, poison_step=None,
                 fail_at=None):
    """``batches(start_step)`` for fit; raises ``Preempted`` when asked for ``fail_at``."""
    def batches(start_step):
        k = start_step
        while True:
            if fail_at is not None and k == fail_at:
                raise Preempted(f"simulated preemption before batch {k}")
            yield make_data(seed, k, batch_size, process_index, process_count, poison_step)
            k += 1
    return batches


class Preempted(RuntimeError):
    pass


def make_model(seed=0, dim=DIM):
    from flax import nnx

    class TinyClassifier(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
            self.norm = nnx.LayerNorm(dim, rngs=rngs)
            self.hidden = nnx.Linear(dim, dim, rngs=rngs)
            self.dropout = nnx.Dropout(0.1)
            self.classifier = nnx.Linear(dim, 2, rngs=rngs)

        def __call__(self, ids, *, deterministic=True, rngs=None):
            x = self.norm(self.embed(ids).mean(axis=1))
            x = nnx.relu(self.hidden(x))
            x = self.dropout(x, deterministic=deterministic, rngs=rngs)
            return self.classifier(x)

    # Created under jit: one compilation instead of one per initializer op.
    return nnx.jit(lambda: TinyClassifier(nnx.Rngs(seed)))()


def loss_fn(model, batch, rngs):
    import jax.numpy as jnp
    import optax
    logits = model(batch["ids"], deterministic=False, rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    loss = loss + jnp.mean(batch["poison"])  # NaN only in a poisoned batch
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    return loss, {"accuracy": accuracy}


# Configuration of the subprocess runs (and of the in-process reference run).
SUBPROCESS_CONFIG = dict(num_steps=4, checkpoint_every=2)


def make_config(**overrides):
    import ml_collections
    from efficient_nlp.train import default_distributed_config, default_train_config
    config = ml_collections.ConfigDict()
    config.train = default_train_config()
    config.train.update(dict(num_steps=20, batch_size=8, learning_rate=1e-2,
                             warmup_ratio=0.1, weight_decay=0.01, log_every=1,
                             checkpoint_every=0, eval_every=0, tensorboard=False,
                             progress_bar=False, async_checkpointing=True))
    config.train.update(overrides)
    config.distributed = default_distributed_config()
    return config


def flat_params(model):
    """``{path: numpy array}`` of the model's nnx.Param leaves (host-local copies)."""
    from flax import nnx
    from efficient_nlp.train import to_host

    def flatten(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flatten(value, f"{prefix}{key}/"))
            else:
                out[f"{prefix}{key}"] = np.asarray(value)
        return out

    return flatten(to_host(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def main(argv):
    mode, workdir = argv[0], argv[1]
    if mode == "multihost":
        port, pid, nproc = int(argv[2]), int(argv[3]), int(argv[4])
        config = make_config(**SUBPROCESS_CONFIG)
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = nproc
        config.distributed.process_id = pid
        config.distributed.initialization_timeout = 60
        from efficient_nlp.train import init_distributed
        init_distributed(config)
        batches = make_batches(8, process_index=pid, process_count=nproc)
    else:
        config = make_config(**SUBPROCESS_CONFIG)
        batches = make_batches(8)
    import jax
    from efficient_nlp.train import fit
    model, history = fit(make_model(), loss_fn, batches, config=config, workdir=workdir)
    params = flat_params(model)
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(),
           "losses": [h["loss"] for h in history if "loss" in h],
           "steps": [h["step"] for h in history if "loss" in h],
           "params": {k: v.tolist() for k, v in params.items()}}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
