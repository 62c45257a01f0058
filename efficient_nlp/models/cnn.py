"""A small VGG-like CNN in Flax NNX for small images (the digits set, 8x8x1).

Blocks of 3x3 ``SAME`` convolutions + ReLU with 2x2 max pooling after the blocks marked in
``pools``, then flatten, one hidden dense + ReLU and the classifier.  Parameter paths:
``convs.<i>.kernel`` (HWIO) / ``convs.<i>.bias``, ``dense.kernel`` / ``dense.bias``,
``classifier.kernel`` / ``classifier.bias``.

``model(images, capture=True)`` returns ``(logits, inputs)`` where ``inputs`` maps every layer
name (``convs.<i>``, ``dense``, ``classifier``) to the tensor that layer receives: what
layer-wise pruning (cross distillation, `efficient_nlp.prune.fewshot`) reconstructs from.

`fit_cnn` trains it with cross-entropy in a small jitted loop (Adam, full-data shuffling).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class SmallCNN(nnx.Module):
    """VGG-like CNN.

    Args:
      channels: output channels of each 3x3 convolution.
      pools: ``True`` after the convolutions followed by 2x2 max pooling (same length).
      hidden: width of the hidden dense layer; num_classes: classifier outputs;
      in_channels: image channels; image_size: input height = width (for the flatten size).
    """

    def __init__(self, channels=(16, 16, 32, 32), pools=(False, True, False, True), hidden: int = 64,
                 num_classes: int = 10, in_channels: int = 1, image_size: int = 8, *, rngs: nnx.Rngs):
        if len(channels) != len(pools):
            raise ValueError(f"channels {channels} and pools {pools} differ in length")
        self.pools = tuple(bool(p) for p in pools)
        convs, c_in = [], in_channels
        for c in channels:
            convs.append(nnx.Conv(c_in, int(c), (3, 3), padding="SAME", rngs=rngs))
            c_in = int(c)
        self.convs = nnx.List(convs)
        size = image_size // (2 ** sum(self.pools))
        if size < 1:
            raise ValueError(f"{sum(self.pools)} poolings do not fit an image of size {image_size}")
        self.dense = nnx.Linear(size * size * c_in, hidden, rngs=rngs)
        self.classifier = nnx.Linear(hidden, num_classes, rngs=rngs)

    def layer_names(self):
        return [f"convs.{i}" for i in range(len(self.convs))] + ["dense", "classifier"]

    def __call__(self, images, *, capture: bool = False):
        x = jnp.asarray(images, jnp.float32)
        inputs = {}
        for i, (conv, pool) in enumerate(zip(self.convs, self.pools)):
            inputs[f"convs.{i}"] = x
            x = jax.nn.relu(conv(x))
            if pool:
                x = nnx.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        inputs["dense"] = x
        x = jax.nn.relu(self.dense(x))
        inputs["classifier"] = x
        logits = self.classifier(x)
        return (logits, inputs) if capture else logits


def cnn_accuracy(model, images, labels, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on numpy ``images`` / ``labels`` (jitted, in batches)."""
    graphdef, state = nnx.split(model)
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = _predict(graphdef, state, jnp.asarray(images[i:i + batch_size]))
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == labels[i:i + batch_size]))
    return correct / max(len(labels), 1)


def _predict_fn(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


_predict = jax.jit(_predict_fn, static_argnums=0)


def fit_cnn(model, images, labels, *, steps: int = 500, batch_size: int = 64, learning_rate: float = 2e-3,
            seed: int = 0):
    """Trains ``model`` in place with cross-entropy (Adam); returns the final training loss."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n = len(labels)
    b = min(batch_size, n)
    perm, pos, loss = rng.permutation(n), 0, jnp.nan
    for _ in range(steps):
        if pos + b > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos:pos + b]
        pos += b
        params, opt_state, loss = step(params, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    nnx.update(model, params)
    return float(loss)
