"""Evaluation shared by every recipe: jitted, data-parallel prediction over a dev split."""
import functools

import jax
import numpy as np
from flax import nnx

from efficient_nlp.train import distributed


def predict_logits(model, batch):
    """Default prediction: the model's logits on a tokenised batch (eval mode)."""
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits


@functools.partial(jax.jit, static_argnums=(0, 3))
def _predict_step(graphdef, state, batch, predict):
    return predict(nnx.merge(graphdef, state), batch)


def predict(model, arrays, batch_size, *, predict_fn=predict_logits, mesh=None):
    """Runs ``predict_fn`` over every example of ``arrays`` once; returns numpy outputs.

    Batches are global (sharded over the mesh's ``data`` axis); padding rows of the last
    batch are dropped, so the result has exactly one row per example, in order.
    """
    from efficient_nlp.data import eval_batches

    mesh = mesh or distributed.make_mesh()
    graphdef, state = nnx.split(model)
    state = distributed.replicate(state, mesh)
    outputs, weights = [], []
    for host_batch in eval_batches(arrays, batch_size):
        batch = distributed.shard_batch(host_batch, mesh)
        out = _predict_step(graphdef, state, batch, predict_fn)
        outputs.append(distributed.host_value(out))
        weights.append(distributed.host_value(batch["weight"]))
    keep = np.concatenate(weights) > 0
    return np.concatenate(outputs)[keep]


def make_eval_fn(arrays, batch_size, metric_fn, *, predict_fn=predict_logits):
    """Returns ``eval_fn(model) -> dict`` computing ``metric_fn(predictions, labels, None)``."""
    labels = np.asarray(arrays["labels"])

    def eval_fn(model):
        predictions = predict(model, arrays, batch_size, predict_fn=predict_fn)
        return {k: float(v) for k, v in metric_fn(predictions, labels, None).items()}

    return eval_fn
