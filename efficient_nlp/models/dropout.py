"""Inverted dropout with call-time randomness and 16-bit keep decisions.

``jax.random.bernoulli`` draws one 32-bit threefry word per element; on CPU that random
stream is the main cost of dropout in BERT training (attention probabilities alone are
B*N*T*T elements per layer). Here each 32-bit word gives two 16-bit uniforms, halving the
RNG work. The drop probability is thereby rounded to a multiple of 2**-16
(0.1 -> 0.100006), far below any effect on training.

For threefry keys the words are computed by `threefry_bits32`, the Threefry-2x32 hash
(Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2, 3") written out round by
round: bit for bit ``jax.random.bits``, but XLA:CPU fuses it into one loop over the words
instead of running jax's CPU lowering (a 5-step while loop that writes both state arrays to
memory each step), about 5x faster on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _is_threefry(key) -> bool:
    """True for a typed threefry key when jax draws bits in its partitionable mode (the
    default; the only mode `threefry_bits32` reproduces)."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return False
    return (str(jax.random.key_impl(key)) == "threefry2x32"
            and bool(getattr(jax.config, "jax_threefry_partitionable", True)))


def threefry_bits32(key, n: int):
    """``jax.random.bits(key, (n,), jnp.uint32)`` for a threefry ``key`` (same bits), unrolled.

    Threefry-2x32 with 20 rounds on the counters ``(0, i)``, ``i < n < 2**32``, keyed by the two
    key words; the output word is the xor of the two hash words (jax's partitionable mode)."""
    k = jax.random.key_data(key)
    ks = (k[0], k[1], k[0] ^ k[1] ^ np.uint32(0x1BD11BDA))
    x0 = jnp.full((n,), ks[0], jnp.uint32)
    x1 = lax.iota(jnp.uint32, n) + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0 ^ x1


def _bits32(key, n: int):
    """``n`` random uint32 words of ``key`` (= ``jax.random.bits``)."""
    if _is_threefry(key) and n < 2 ** 32:
        return threefry_bits32(key, n)
    return jax.random.bits(key, (n,), jnp.uint32)


def dropout(x, rate, key):
    """Zeroes each element with probability ``rate`` (to 2**-16) and scales the rest by 1/(1-rate)."""
    if rate <= 0.0:
        return x
    if rate >= 1.0:
        return jnp.zeros_like(x)
    n = x.size
    words = _bits32(key, (n + 1) // 2)
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
