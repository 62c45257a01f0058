"""A small VGG-like CNN in Flax NNX for small images (the digits set, 8x8x1).

Blocks of 3x3 ``SAME`` convolutions + ReLU with 2x2 max pooling after the blocks marked in
``pools``, then flatten, one hidden dense + ReLU and the classifier.  Parameter paths:
``convs.<i>.kernel`` (HWIO) / ``convs.<i>.bias``, ``dense.kernel`` / ``dense.bias``,
``classifier.kernel`` / ``classifier.bias``.

``model(images, capture=True)`` returns ``(logits, inputs)`` where ``inputs`` maps every layer
name (``convs.<i>``, ``dense``, ``classifier``) to the tensor that layer receives: what
layer-wise pruning (cross distillation, `efficient_nlp.prune.fewshot`) reconstructs from.

`fit_cnn` trains it with cross-entropy (Adam, full-data shuffling) through `efficient_nlp.train.run`;
`cnn_accuracy` evaluates it through `efficient_nlp.train.predict`.
"""
from __future__ import annotations

import functools

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
        logits = self.classifier(x).astype(jnp.float32)  # float32 whatever the compute dtype
        return (logits, inputs) if capture else logits


def cnn_logits(model, batch):
    """The logits of a batch ``{"images": ...}`` (the prediction function of `cnn_accuracy`)."""
    return model(batch["images"])


def cnn_accuracy(model, images, labels, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on numpy ``images`` / ``labels`` (`efficient_nlp.train.predict`)."""
    from efficient_nlp.train.evaluate import predict

    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    logits = predict(model, {"images": np.asarray(images), "labels": labels}, batch_size, predict_fn=cnn_logits)
    return float(np.mean(np.argmax(logits, -1) == labels))


def cnn_loss(model, batch, rngs=None):
    """Mean cross-entropy of a batch ``{"images", "labels"}``; ``(loss, None)`` as `train.run` wants."""
    logits = model(batch["images"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), None


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float):
    return optax.adam(learning_rate)  # one optimizer object per rate: the compiled step is reused


def _shuffled_batches(images, labels, batch_size, seed):
    """Batches of a fresh permutation of the data each epoch (the last partial batch skipped)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    b = min(batch_size, n)
    perm, pos = rng.permutation(n), 0
    while True:
        if pos + b > n:
            perm, pos = rng.permutation(n), 0
        idx = perm[pos:pos + b]
        pos += b
        yield {"images": images[idx], "labels": labels[idx]}


def fit_cnn(model, images, labels, *, steps: int = 500, batch_size: int = 64, learning_rate: float = 2e-3,
            seed: int = 0):
    """Trains ``model`` in place with cross-entropy (Adam, `efficient_nlp.train.run`); returns the
    training loss of the last update (NaN for ``steps=0``)."""
    from efficient_nlp.train.step import run

    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    trained, history = run(model, cnn_loss, _adam(float(learning_rate)),
                           _shuffled_batches(images, labels, batch_size, seed), steps=steps)
    nnx.update(model, nnx.state(trained))
    return history[-1]["loss"] if history else float("nan")
