"""efficient_nlp: compress Transformers in JAX/Flax NNX.

Layers (bottom up): ``models`` (BERT-family encoders, HF checkpoint loading), ``data``
(tasks, files, tokenisation, batching), ``train`` (the one training loop, sharding,
checkpoints, metrics) and ``recipes`` (short functions wiring them from a config).
"""

__version__ = "0.1.0"
