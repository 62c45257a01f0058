"""Evaluation shared by every recipe: one jitted, data-parallel prediction over a split.

`predict` runs ``predict_fn(model, batch)`` over every example once.  The compiled step
depends on the model's structure and on ``predict_fn`` only (pass a module-level function or
another hashable callable, not a fresh lambda per call), and parameters already on the
mesh's devices are used where they are: calling it again does not copy them.
"""
import functools

import jax
import numpy as np
from flax import nnx

from efficient_nlp.models import family as F
from efficient_nlp.train import distributed


def predict_logits(model, batch):
    """Default prediction: the model's logits on a tokenised batch (eval mode), for any
    family (`efficient_nlp.models.family.forward`)."""
    return F.forward(model, batch).logits


@functools.partial(jax.jit, static_argnums=(0, 3))
def _predict_step(graphdef, state, batch, predict):
    return predict(nnx.merge(graphdef, state), batch)


def eval_mode(model):
    """``model`` with every ``nnx.Dropout`` switched off: the model itself when none is on, else
    a copy.  The models' own dropout follows each call's ``deterministic`` argument; a module
    that holds its own random stream (LoRA's dropout, `efficient_nlp.peft`) must be switched."""
    if not any(isinstance(m, nnx.Dropout) and not m.deterministic for _, m in nnx.iter_modules(model)):
        return model
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
            module.deterministic = True
    return model


def placed_state(model, mesh):
    """``(graphdef, state)`` of ``model`` in `eval_mode` with the state replicated over ``mesh``;
    arrays already there (a single-device model on a one-device mesh, a model trained by
    ``fit``) are used as they are, so repeated evaluations transfer nothing."""
    graphdef, state = nnx.split(eval_mode(model))
    return graphdef, distributed.place(state, mesh)


def predict(model, arrays, batch_size, *, predict_fn=predict_logits, mesh=None):
    """Runs ``predict_fn(model, batch)`` over every example of ``arrays`` once; returns numpy
    outputs (an array, or a pytree of arrays) with one row per example, in order.

    Batches are global (sharded over the mesh's ``data`` axis; default mesh: all devices);
    padding rows of the last batch are dropped.
    """
    from efficient_nlp.data import eval_batches

    mesh = mesh or distributed.make_mesh()
    graphdef, state = placed_state(model, mesh)
    outputs, weights = [], []
    for host_batch in eval_batches(arrays, batch_size):
        batch = distributed.shard_batch(host_batch, mesh)
        outputs.append(distributed.to_host(_predict_step(graphdef, state, batch, predict_fn)))
        weights.append(distributed.host_value(batch["weight"]))
    keep = np.concatenate(weights) > 0
    return jax.tree.map(lambda *xs: np.concatenate(xs)[keep], *outputs)


def make_eval_fn(arrays, batch_size, metric_fn, *, predict_fn=predict_logits):
    """Returns ``eval_fn(model) -> dict`` computing ``metric_fn(predictions, labels, None)``."""
    labels = np.asarray(arrays["labels"])

    def eval_fn(model):
        predictions = predict(model, arrays, batch_size, predict_fn=predict_fn)
        return {k: float(v) for k, v in metric_fn(predictions, labels, None).items()}

    return eval_fn
