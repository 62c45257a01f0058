"""efficient_nlp.quant quantizers and packing against direct NumPy formulas (docs/quantization.md)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_nlp import quant

AXES = [None, 1, 0]  # per tensor, per row of [rows, cols] (reduce cols), per column
SHAPE = (6, 8)  # one shape everywhere: eager ops compile once


def rand(shape, seed=0, scale=1.0):
    return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)


def np_reduce(fn, x, axis):
    return fn(x) if axis is None else fn(x, axis=axis, keepdims=True)


def away_from_ties(v, tol=1e-3):
    """Elements whose pre-rounding value is not within ``tol`` of a rounding tie (k + 1/2)."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) > tol


def groups(x, axis):
    """The scale groups of ``x`` (each a 1-D array of the elements sharing one scale)."""
    if axis is None:
        return [x.reshape(-1)]
    return list(np.moveaxis(x, 1 - axis, 0).reshape(x.shape[1 - axis], -1))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", [
    lambda x, b: quant.uniform(x, b),
    lambda x, b: quant.uniform_params(x, b),
    lambda x, b: quant.lsq(x, 0.1, b),
    lambda x, b: quant.lsq_init(x, b),
    lambda x, b: quant.lsq_plus(x, 0.1, 0.0, b),
    lambda x, b: quant.clip_quant(x, -1.0, 1.0, b),
    lambda x, b: quant.quantize_codes(x, 1.0, 0.0, b),
])
@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, "4"])
def test_bits_out_of_range_fail_clearly(fn, bits):
    with pytest.raises(ValueError, match="bits must be"):
        fn(jnp.ones((2, 3)), bits)


@pytest.mark.parametrize("fn", [lambda x: quant.uniform(x, 1), lambda x: quant.lsq(x, 0.1, 1),
                                lambda x: quant.clip_quant(x, -1.0, 1.0, 1),
                                lambda x: quant.uniform_params(x, 1)])
def test_signed_one_bit_is_rejected_with_a_pointer_to_bwn(fn):
    with pytest.raises(ValueError, match="bwn"):
        fn(jnp.ones((2, 3)))


def test_other_argument_errors():
    x = jnp.ones(SHAPE)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda x, b: quant.uniform(x, b))(x, 4)
    with pytest.raises(ValueError, match="range_mode"):
        quant.uniform(x, 4, range_mode="percentile")
    with pytest.raises(ValueError, match="axis"):
        quant.uniform(x, 4, axis=2)
    with pytest.raises(ValueError, match="does not broadcast"):
        quant.lsq(x, jnp.ones((4,)), 4)
    # unsigned 1-bit is a valid two-level grid [min, max]
    levels = np.tile(np.float32([0.0, 0.2, 0.9, 1.0]), 12).reshape(SHAPE)
    y = np.asarray(quant.uniform(jnp.asarray(levels), 1, signed=False))
    np.testing.assert_allclose(y, np.where(levels > 0.5, 1.0, 0.0))


# ----------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_signed_matches_numpy(bits, axis):
    x = rand(SHAPE, seed=bits)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np_reduce(np.max, np.abs(x), axis) / qp
    v = x / s
    ref = s * np.clip(np.round(v), qn, qp)
    got = np.asarray(quant.uniform(jnp.asarray(x), bits, axis=axis))
    ok = away_from_ties(v)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, ref, atol=np.max(s) * 1.0001)  # ties: at most one step
    # minmax == absmax for the symmetric grid
    np.testing.assert_array_equal(got, quant.uniform(jnp.asarray(x), bits, axis=axis, range_mode="minmax"))


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_uniform_unsigned_matches_numpy(bits, axis):
    x = rand(SHAPE, seed=10 + bits) + 0.5
    qp = 2 ** bits - 1
    mn, mx = np_reduce(np.min, x, axis), np_reduce(np.max, x, axis)
    s = (mx - mn) / qp
    v = (x - mn) / s
    ref = s * np.clip(np.round(v), 0, qp) + mn
    got = np.asarray(quant.uniform(jnp.asarray(x), bits, signed=False, axis=axis))
    ok = away_from_ties(v)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-5)
    # the range end points are levels
    np.testing.assert_allclose(np_reduce(np.min, got, axis), mn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_reduce(np.max, got, axis), mx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uniform_on_grid_and_idempotent(bits, axis, signed):
    x = rand(SHAPE, seed=3 * bits)
    y = np.asarray(quant.uniform(jnp.asarray(x), bits, signed=signed, axis=axis))
    for g in groups(y, axis):
        assert len(np.unique(g)) <= 2 ** bits
    # every value is scale * (k - zero_point) for an integer k in the b-bit code range
    s, zp = (np.asarray(a) for a in quant.uniform_params(jnp.asarray(x), bits, signed, axis))
    k = y / s + zp
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert np.round(k).min() >= -(2 ** (bits - 1)) and np.round(k).max() <= 2 ** (bits - 1) - 1
    yy = np.asarray(quant.uniform(jnp.asarray(y), bits, signed=signed, axis=axis))
    np.testing.assert_allclose(yy, y, rtol=1e-5, atol=1e-6)
    s, zp = quant.uniform_params(jnp.asarray(y), bits, signed, axis)
    c1 = quant.quantize_codes(jnp.asarray(y), s, zp, bits, signed)
    s2, zp2 = quant.uniform_params(jnp.asarray(yy), bits, signed, axis)
    np.testing.assert_array_equal(c1, quant.quantize_codes(jnp.asarray(yy), s2, zp2, bits, signed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_equals_dequantized_codes_exactly(bits, axis, signed):
    x = jnp.asarray(rand(SHAPE, seed=bits + 100))
    s, zp = quant.uniform_params(x, bits, signed, axis)
    codes = quant.quantize_codes(x, s, zp, bits, signed)
    assert codes.dtype == jnp.int8
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert s.shape == (() if axis is None else np_reduce(np.max, np.asarray(x), axis).shape)
    np.testing.assert_array_equal(quant.uniform(x, bits, signed, axis), quant.dequantize(codes, s, zp))
    jitted = jax.jit(lambda x: quant.uniform(x, bits, signed, axis))(x)
    np.testing.assert_array_equal(jitted, quant.dequantize(codes, s, zp))
    if signed:
        assert not np.any(np.asarray(zp))
        np.testing.assert_array_equal(quant.uniform(x, bits, signed, axis), s * codes)
    else:  # codes are the levels u = round((x - min)/s) offset by -2^(b-1)
        mn = np_reduce(np.min, np.asarray(x), axis)
        u = np.asarray(codes).astype(np.int32) + 2 ** (bits - 1)
        assert u.min() == 0 and u.max() == 2 ** bits - 1
        np.testing.assert_allclose(np.asarray(s) * u + mn, quant.uniform(x, bits, signed, axis),
                                   rtol=1e-5, atol=1e-6)


def test_uniform_all_zero_and_constant_tensors():
    z = jnp.zeros(SHAPE)
    for signed in (True, False):
        for axis in (None, 1):
            y = quant.uniform(z, 4, signed=signed, axis=axis)
            assert np.all(np.asarray(y) == 0)
            g = jax.grad(lambda x: jnp.sum(quant.uniform(x, 4, signed=signed, axis=axis) ** 2 + x))(z)
            assert np.all(np.isfinite(np.asarray(g)))
    c = jnp.full(SHAPE, 0.75)
    np.testing.assert_allclose(quant.uniform(c, 4, signed=False), c, rtol=1e-6)
    np.testing.assert_allclose(quant.uniform(c, 4, signed=True), c, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(quant.uniform_params(z, 4, False)[1])))


@pytest.mark.parametrize("signed", [True, False])
def test_uniform_straight_through_gradient_is_identity(signed):
    x = jnp.asarray(rand(SHAPE, seed=7))
    w = jnp.asarray(rand(SHAPE, seed=8))
    g = jax.grad(lambda x: jnp.sum(w * quant.uniform(x, 3, signed=signed, axis=1)))(x)
    np.testing.assert_array_equal(g, w)
    # forward mode works as well
    _, t = jax.jvp(lambda x: quant.uniform(x, 3, signed=signed), (x,), (w,))
    np.testing.assert_array_equal(t, w)


# ----------------------------------------------------------------------------- PACT clipping
@pytest.mark.parametrize("signed", [True, False])
def test_clip_quant_forward_and_gradients(signed):
    x = rand(SHAPE, seed=21, scale=1.5)
    lo, hi = (-1.0, 1.2) if signed else (-0.3, 1.0)
    bits = 3
    y = np.clip(x, lo, hi)
    if signed:
        qp = 2 ** (bits - 1) - 1
        s = max(abs(lo), abs(hi)) / qp
        v = y / s
        ref = s * np.clip(np.round(v), -qp - 1, qp)
    else:
        s = (hi - lo) / (2 ** bits - 1)
        v = (y - lo) / s
        ref = lo + s * np.round(v)
    got = np.asarray(quant.clip_quant(jnp.asarray(x), lo, hi, bits, signed))
    ok = away_from_ties(v)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6, atol=1e-6)
    assert got.min() >= lo - 1e-6 and got.max() <= hi + 1e-6
    w = rand(SHAPE, seed=22)
    gx, glo, ghi = jax.grad(lambda x, lo, hi: jnp.sum(jnp.asarray(w) * quant.clip_quant(x, lo, hi, bits, signed)),
                            argnums=(0, 1, 2))(jnp.asarray(x), jnp.float32(lo), jnp.float32(hi))
    below, above = x < lo, x > hi
    assert below.any() and above.any()
    np.testing.assert_array_equal(gx, np.where(below | above, 0.0, w))
    np.testing.assert_allclose(glo, w[below].sum(), rtol=1e-5)
    np.testing.assert_allclose(ghi, w[above].sum(), rtol=1e-5)


def test_clip_quant_per_channel_clip_values():
    x = rand(SHAPE, seed=23, scale=2.0)
    hi = np.linspace(0.5, 2.0, 8, dtype=np.float32)[None, :]
    w = rand(SHAPE, seed=24)
    glo, ghi = jax.grad(lambda lo, hi: jnp.sum(jnp.asarray(w) * quant.clip_quant(jnp.asarray(x), lo, hi, 4)),
                        argnums=(0, 1))(jnp.asarray(-hi), jnp.asarray(hi))
    assert glo.shape == ghi.shape == (1, 8)
    np.testing.assert_allclose(ghi, np.where(x > hi, w, 0).sum(0, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(glo, np.where(x < -hi, w, 0).sum(0, keepdims=True), rtol=1e-5, atol=1e-6)
    y = np.asarray(quant.clip_quant(jnp.asarray(x), jnp.asarray(-hi), jnp.asarray(hi), 4))
    assert np.all(np.abs(y) <= hi + 1e-6)


# ----------------------------------------------------------------------------- LSQ
def lsq_ref(x, s, bits, signed, g, n_group):
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    v = x / s
    fwd = s * np.clip(np.round(v), qn, qp)
    low, high = v <= qn, v >= qp
    gx = np.where(low | high, 0.0, g)
    ds = np.where(low, qn, np.where(high, qp, np.round(v) - v)) * g / math.sqrt(n_group * qp)
    return fwd, gx, ds, v


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_forward_and_gradients_match_closed_form(bits, signed):
    x = rand(SHAPE, seed=30 + bits)
    s = float(0.6 * np.max(np.abs(x)) / (2 ** (bits - 1) - 1))  # some elements clip
    g = rand(SHAPE, seed=40 + bits)
    fwd, gx_ref, ds_ref, v = lsq_ref(x, np.float32(s), bits, signed, g, x.size)
    got = np.asarray(quant.lsq(jnp.asarray(x), s, bits, signed))
    ok = away_from_ties(v)
    np.testing.assert_allclose(got[ok], fwd[ok], rtol=1e-6, atol=1e-7)
    gx, gs = jax.grad(lambda x, s: jnp.sum(jnp.asarray(g) * quant.lsq(x, s, bits, signed)), argnums=(0, 1))(
        jnp.asarray(x), jnp.float32(s))
    np.testing.assert_array_equal(gx, gx_ref)
    assert (gx_ref == 0).any() and (gx_ref != 0).any()
    np.testing.assert_allclose(gs, ds_ref.sum(), rtol=1e-4, atol=1e-6)


def test_lsq_step_gradient_finite_difference_where_smooth():
    # all elements clipped: forward = s * Qp (or s * Qn) is linear in s, derivative sum(g * Qp/Qn)
    x = (np.sign(rand(SHAPE, seed=49)) * np.linspace(3.0, 5.0, 48).reshape(SHAPE)).astype(np.float32)
    assert (x > 0).any() and (x < 0).any()
    g = rand(SHAPE, seed=50)
    f = lambda s: jnp.sum(jnp.asarray(g) * quant.lsq(jnp.asarray(x), s, 3, grad_scale=1.0))
    s, h = 0.5, 1e-3
    fd = (f(s + h) - f(s - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(s)), fd, rtol=1e-3)
    # and the default gradient scale is 1/sqrt(numel * Qp) of it
    f2 = lambda s: jnp.sum(jnp.asarray(g) * quant.lsq(jnp.asarray(x), s, 3))
    np.testing.assert_allclose(jax.grad(f2)(jnp.float32(s)), fd / math.sqrt(48 * 3), rtol=1e-3)


def test_lsq_per_channel_step():
    x = rand(SHAPE, seed=60)
    s = np.linspace(0.1, 0.45, 8, dtype=np.float32)[None, :]
    g = rand(SHAPE, seed=61)
    gx, gs = jax.grad(lambda x, s: jnp.sum(jnp.asarray(g) * quant.lsq(x, s, 3)), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(s))
    assert gs.shape == (1, 8)
    fwd, gx_ref, ds_ref, _ = lsq_ref(x, s, 3, True, g, n_group=6)  # 6 elements share each step
    np.testing.assert_allclose(gs, ds_ref.sum(0, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(gx, gx_ref)


@pytest.mark.parametrize("axis", AXES)
def test_lsq_init(axis):
    x = rand(SHAPE, seed=70)
    for bits, signed, k in [(4, True, 2.0), (8, True, 2.0), (4, False, 4.0)]:
        qp = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        ref = k * np_reduce(np.mean, np.abs(x), axis) / math.sqrt(qp)
        got = quant.lsq_init(jnp.asarray(x), bits, signed, axis)
        assert got.shape == np.shape(ref)
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(quant.lsq_init(jnp.zeros(3), 4)) > 0


def test_lsq_plus_forward_and_gradients():
    x = rand(SHAPE, seed=80) + 0.3
    s, b, bits = 0.15, -0.4, 3
    qp = 2 ** bits - 1
    g = rand(SHAPE, seed=81)
    v = (x - b) / s
    ref = s * np.clip(np.round(v), 0, qp) + b
    got = np.asarray(quant.lsq_plus(jnp.asarray(x), s, b, bits))
    ok = away_from_ties(v)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-5, atol=1e-6)
    gx, gs, gb = jax.grad(lambda x, s, b: jnp.sum(jnp.asarray(g) * quant.lsq_plus(x, s, b, bits)),
                          argnums=(0, 1, 2))(jnp.asarray(x), jnp.float32(s), jnp.float32(b))
    low, high = v <= 0, v >= qp
    assert low.any() and high.any()
    np.testing.assert_array_equal(gx, np.where(low | high, 0.0, g))
    ds = np.where(low, 0.0, np.where(high, qp, np.round(v) - v)) * g / math.sqrt(x.size * qp)
    np.testing.assert_allclose(gs, ds.sum(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, g[low | high].sum(), rtol=1e-5)


# ----------------------------------------------------------------------------- TWN / BWN
@pytest.mark.parametrize("axis", AXES)
def test_twn_keeps_large_weights_with_the_mean_scale(axis):
    w = rand(SHAPE, seed=90)
    a = np.abs(w).astype(np.float64)
    delta = 0.7 * np_reduce(np.mean, a, axis)
    keep = a >= delta
    near = np.abs(a - delta) < 1e-5 * np.maximum(delta, 1e-12)
    assert not near.any()  # no element sits on the threshold for this seed
    alpha_ref = np_reduce(np.sum, a * keep, axis) / np_reduce(np.sum, keep, axis)
    w_hat, alpha = quant.twn(jnp.asarray(w), axis)
    codes, alpha2 = quant.ternary_codes(jnp.asarray(w), axis)
    assert alpha.shape == np.shape(alpha_ref)
    np.testing.assert_allclose(alpha, alpha_ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(codes) != 0, keep)
    np.testing.assert_array_equal(np.asarray(codes)[keep], np.sign(w)[keep])
    assert codes.dtype == jnp.int8
    np.testing.assert_array_equal(w_hat, alpha2 * codes)
    np.testing.assert_allclose(w_hat, np.where(keep, alpha_ref * np.sign(w), 0.0), rtol=1e-5)
    g = jax.grad(lambda w: jnp.sum(jnp.arange(48.0).reshape(SHAPE) * quant.twn(w, axis)[0]))(jnp.asarray(w))
    np.testing.assert_array_equal(g, np.arange(48.0).reshape(SHAPE))


def test_twn_all_zero_rows_have_zero_scale():
    w = rand(SHAPE, seed=91)
    w[0] = 0.0
    w_hat, alpha = quant.twn(jnp.asarray(w), axis=1)
    assert alpha.shape == (6, 1) and float(alpha[0, 0]) == 0.0 and np.all(np.asarray(alpha[1:]) > 0)
    assert np.all(np.asarray(w_hat[0]) == 0) and np.all(np.isfinite(np.asarray(w_hat)))


@pytest.mark.parametrize("axis", AXES)
def test_bwn_sign_with_zero_as_plus_one(axis):
    w = rand(SHAPE, seed=92)
    w[0, 0] = 0.0
    w[2, 3] = -0.0
    alpha_ref = np_reduce(np.mean, np.abs(w), axis)
    w_hat, alpha = quant.bwn(jnp.asarray(w), axis)
    codes, alpha2 = quant.binary_codes(jnp.asarray(w), axis)
    assert alpha.shape == np.shape(alpha_ref) and codes.dtype == jnp.int8
    np.testing.assert_allclose(alpha, alpha_ref, rtol=1e-6)
    np.testing.assert_array_equal(codes, np.where(w >= 0, 1, -1))
    assert int(codes[0, 0]) == 1 and int(codes[2, 3]) == 1
    np.testing.assert_array_equal(w_hat, alpha2 * codes)
    np.testing.assert_array_equal(np.abs(np.asarray(w_hat)), np.broadcast_to(np.asarray(alpha), w.shape))
    g = jax.grad(lambda w: jnp.sum(3.0 * quant.bwn(w, axis)[0]))(jnp.asarray(w))
    np.testing.assert_array_equal(g, np.full(w.shape, 3.0))


# ----------------------------------------------------------------------------- jit
def test_every_quantizer_jits_to_the_eager_result():
    x = jnp.asarray(rand(SHAPE, seed=99))
    s = quant.lsq_init(x, 4, axis=0)
    fns = {
        "uniform": lambda x: quant.uniform(x, 4, axis=1),
        "uniform_u": lambda x: quant.uniform(x, 4, signed=False),
        "params": lambda x: quant.uniform_params(x, 4, False, 1),
        "codes": lambda x: quant.quantize_codes(x, *quant.uniform_params(x, 4), 4),
        "clip": lambda x: quant.clip_quant(x, -0.5, 0.8, 4, False),
        "lsq": lambda x: quant.lsq(x, s, 4),
        "lsq_grad": jax.grad(lambda x: jnp.sum(quant.lsq(x, s, 4) ** 2)),
        "lsq_plus": lambda x: quant.lsq_plus(x, 0.1, -0.3, 4),
        "lsq_init": lambda x: quant.lsq_init(x, 4, axis=1),
        "twn": lambda x: quant.twn(x, axis=1),
        "bwn": lambda x: quant.bwn(x),
        "ternary": lambda x: quant.ternary_codes(x, 0),
        "binary": lambda x: quant.binary_codes(x, 0),
    }
    for name, fn in fns.items():
        eager, jitted = fn(x), jax.jit(fn)(x)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=name)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 5), (16,)])
def test_pack_round_trip(bits, shape):
    rng = np.random.RandomState(bits * 100 + len(shape))
    if bits == 1:
        codes = rng.choice([-1, 1], size=shape).astype(np.int8)
    else:
        codes = rng.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), size=shape).astype(np.int8)
    numel = int(np.prod(shape))
    packed = quant.pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == quant.packed_nbytes(numel, bits) == math.ceil(numel * bits / 8)
    out = quant.unpack(packed, bits, shape)
    assert out.dtype == np.int8 and out.shape == shape
    np.testing.assert_array_equal(out, codes)
    # unsigned codes round trip too
    u = rng.randint(0, 2 ** bits, size=shape).astype(np.uint8)
    pu = quant.pack(u, bits, signed=False)
    ou = quant.unpack(pu, bits, shape, signed=False)
    assert ou.dtype == np.uint8
    np.testing.assert_array_equal(ou, u)


def test_pack_layout_and_byte_counts():
    # 2-bit codes -2,-1,0,1 -> fields 0,1,2,3, little-endian inside the byte: 0b11_10_01_00
    np.testing.assert_array_equal(quant.pack(np.array([-2, -1, 0, 1]), 2), [0b11100100])
    np.testing.assert_array_equal(quant.pack(np.array([1, -1, -1, 1, 1, 1, -1, 1, 1]), 1),
                                  [0b10111001, 0b1])
    np.testing.assert_array_equal(quant.pack(np.array([-8, 7, 0]), 4), [0xF0, 0x08])
    np.testing.assert_array_equal(quant.pack(np.array([-128, 0, 127]), 8), [0, 128, 255])
    assert [quant.packed_nbytes(n, 1) for n in (0, 1, 8, 9)] == [0, 1, 1, 2]
    assert [quant.packed_nbytes(n, 2) for n in (3, 4, 5)] == [1, 1, 2]
    assert [quant.packed_nbytes(n, 4) for n in (1, 2, 3)] == [1, 1, 2]
    assert quant.packed_nbytes(1000, 8) == 1000
    assert quant.pack(np.zeros((0,), np.int8), 2).size == 0


def test_pack_errors():
    with pytest.raises(ValueError, match="one of"):
        quant.pack(np.zeros(4, np.int8), 3)
    with pytest.raises(ValueError, match="outside"):
        quant.pack(np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="outside"):
        quant.pack(np.array([1, 0, -1]), 1)  # binary codes have no 0
    with pytest.raises(ValueError, match="outside"):
        quant.pack(np.array([-1, 3]), 2, signed=False)
    with pytest.raises(ValueError, match="integer"):
        quant.pack(np.array([0.5, 1.0]), 4)
    with pytest.raises(ValueError, match="bytes"):
        quant.unpack(np.zeros(3, np.uint8), 2, (5, 3))
    with pytest.raises(ValueError, match="one of"):
        quant.packed_nbytes(10, 5)


def test_exported_codes_pack_and_restore_the_quantized_tensor():
    x = jnp.asarray(rand(SHAPE, seed=123))
    for bits, signed in [(2, True), (4, True), (8, True), (4, False), (8, False)]:
        s, zp = quant.uniform_params(x, bits, signed, axis=1)
        codes = quant.quantize_codes(x, s, zp, bits, signed)
        stored = quant.pack(codes, 8 if bits > 4 else bits)
        back = quant.unpack(stored, 8 if bits > 4 else bits, codes.shape)
        np.testing.assert_array_equal(quant.dequantize(back, s, zp), quant.uniform(x, bits, signed, 1))
    codes, alpha = quant.ternary_codes(x)
    back = quant.unpack(quant.pack(codes, 2), 2, codes.shape)
    np.testing.assert_array_equal(alpha * back, quant.twn(x)[0])
    codes, alpha = quant.binary_codes(x, axis=1)
    back = quant.unpack(quant.pack(codes, 1), 1, codes.shape)
    np.testing.assert_array_equal(alpha * back, quant.bwn(x, axis=1)[0])
