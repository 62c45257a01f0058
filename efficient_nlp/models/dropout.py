"""Inverted dropout with call-time randomness and 16-bit keep decisions.

``jax.random.bernoulli`` draws one 32-bit threefry word per element; on CPU that random
stream is the main cost of dropout in BERT training (attention probabilities alone are
B*N*T*T elements per layer). Here each 32-bit word gives two 16-bit uniforms, halving the
RNG work. The drop probability is thereby rounded to a multiple of 2**-16
(0.1 -> 0.100006), far below any effect on training.
"""
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


def dropout(x, rate, key):
    """Zeroes each element with probability ``rate`` (to 2**-16) and scales the rest by 1/(1-rate)."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    n = x.size
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    uniform16 = lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
    threshold = jnp.uint16(min(round(rate * 65536), 65535))
    # Materialise the mask once: otherwise XLA fuses the random stream into each consumer
    # (forward and backward) and recomputes it there.
    keep = lax.optimization_barrier(uniform16 >= threshold)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nnx.Module):
    """``Dropout(rate)(x, deterministic=..., rngs=nnx.Rngs(dropout=key))``; the module holds no RNG state."""

    def __init__(self, rate: float):
        self.rate = float(rate)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError(
                "Dropout with deterministic=False needs rngs=nnx.Rngs(dropout=key) at call time.")
        return dropout(x, self.rate, rngs.dropout())
