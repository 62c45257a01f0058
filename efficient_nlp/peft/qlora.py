"""QLoRA's frozen 4-bit base (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

    qmodel, report = qlora.quantize_base(model)            # NF4, blocks of 64, double-quantized scales
    print(report)                                           # sites, bytes, bits per parameter
    lmodel, _ = peft.add_lora(qmodel, roles=("q", "v"), rank=8, alpha=16)
    trained, history = train.run(lmodel, loss_fn, optax.adamw(1e-4), batches, steps=1000,
                                 trainable=peft.trainable(lmodel))

The Linear layers of the layer stack (every role of `efficient_nlp.models.family.LAYER_ROLES` by
default, any family) become `PackedLinear`: 4-bit codes packed two per byte
(`efficient_nlp.quant.packing`) with their scales and the bias, all held in `QuantizedBase`
variables, which are not ``nnx.Param``: no optimizer state, no gradient, bit-identical after
training.  The embeddings and the head (pooler, classifier, LM head) stay in float, as in the
paper, which quantizes the transformer's linear layers only.

Grids (``grid``; the 4-bit code ``c`` selects level ``L[c]``):

* ``nf4``: 4-bit NormalFloat (`nf4_levels`), with one abs-max per block of ``block_size``
  consecutive elements of the flattened ``[d_in, d_out]`` kernel (C order):
  ``w = absmax_block * L[c]``;
* ``int4``: the same blocks on the 15 symmetric uniform levels ``k / 7``, ``k = -7 .. 7`` (zero
  and +-absmax exact; the 16th code is unused), the uniform baseline NF4 is compared with;
* ``lsq``: the grid a 4-bit quantization-aware training run learned (`from_quant_linear`): the
  signed codes ``-8 .. 7`` times the QAT quantizer's step (per tensor, per output channel or per
  group), so the packed base computes exactly the weight that QAT trained.

Double quantization (``double_quant=True``, the paper's default) stores the block abs-maxes
themselves in 8 bits: the mean is subtracted and the centred values are quantized symmetrically
in blocks of 256 (`double_quantize`), which brings the scales from 32 / 64 = 0.5 to
8 / 64 + 32 / (64 * 256) = 0.127 bits per parameter, 4.127 bits in all at block 64.

Training memory: `PackedLinear.__call__` is a ``jax.custom_vjp`` whose saved residuals are the
packed codes and scales (already held by the model), not the float kernel; the backward pass
dequantizes the kernel again, layer by layer, and each dequantization is tied to the matmul's
own input (forward) or cotangent (backward), so that XLA neither computes every kernel up front
nor merges the two passes' copies: the float base never exists for every layer at once.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant import modules as M
from efficient_nlp.quant.export import dequantize_weight, weight_codes
from efficient_nlp.quant.packing import pack

GRIDS = ("nf4", "int4", "lsq")
BLOCK_GRIDS = ("nf4", "int4")
#: Blocks of the double quantization of the abs-maxes (the paper's 256).
DOUBLE_QUANT_BLOCK = 256
_DQ_MAX = 127  # symmetric int8 codes -127 .. 127
_LSQ_BITS = 4


# ----------------------------------------------------------------------------- grids
def _nf4() -> np.ndarray:
    inv = NormalDist().inv_cdf
    top = 1.0 - 0.5 * (1 / 32 + 1 / 30)
    positive = [inv(p) for p in np.linspace(top, 0.5, 9)[:-1]]
    negative = [-inv(p) for p in np.linspace(top, 0.5, 8)[:-1]]
    levels = np.sort(np.asarray(positive + negative + [0.0]))
    return (levels / levels[-1]).astype(np.float32)


_NF4 = _nf4()
_INT4 = (np.arange(-7, 8) / 7).astype(np.float32)


def nf4_levels() -> np.ndarray:
    """The 16 levels of 4-bit NormalFloat (QLoRA, section 3), ascending, float32.

    Quantiles of the standard normal, asymmetric so that zero is a level: 8 positive levels
    ``Phi^-1(p)`` at ``p`` evenly spaced from ``1 - delta`` down to (not including) 1/2, 7
    negative ones ``-Phi^-1(p)`` at ``p`` evenly spaced over the same range in 7 steps, and 0;
    all divided by the largest, so they span ``[-1, 1]``.  ``delta = (1/32 + 1/30) / 2`` (the
    published construction: ``Phi^-1(1)`` is infinite, so the extreme level sits half way
    between the end quantiles of a 16- and a 15-level half).  Each level is equally likely for
    normally distributed weights scaled by their block's abs-max.
    """
    return _NF4.copy()


def grid_levels(grid: str) -> np.ndarray:
    """The levels of a block grid: `nf4_levels` (16) or the int4 levels ``k / 7``, ``k = -7..7``
    (15, symmetric uniform; zero and +-1 exact)."""
    _check_grid(grid, BLOCK_GRIDS, "grid_levels")
    return nf4_levels() if grid == "nf4" else _INT4.copy()


def _check_grid(grid, valid, fn):
    if grid not in valid:
        extra = (" ('lsq' takes its steps from a quantization-aware trained QuantLinear: use "
                 "from_quant_linear or quantize_base(..., grid='lsq'))" if grid == "lsq" else "")
        raise ValueError(f"{fn}: unknown grid {grid!r}; valid: {valid}{extra}")


def _check_block(n: int, block_size, what: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    block_size = int(block_size)
    if n % block_size:
        valid = [d for d in (16, 32, 64, 128, 256, 512, 1024) if n % d == 0]
        raise ValueError(f"block_size {block_size} does not divide the {n} elements of {what}; "
                         f"block sizes that do: {valid or 'none of 16..1024 (pick a divisor of ' + str(n) + ')'}")
    return block_size


# ----------------------------------------------------------------------------- block quantization
def quantize_blocks(w, grid: str = "nf4", block_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise abs-max quantization of ``w`` (any shape, flattened in C order) on a 4-bit grid.

    Every block of ``block_size`` consecutive elements gets ``absmax = max |w|`` over the block;
    each element becomes the index of the level of `grid_levels` nearest to ``w / absmax`` (an
    all-zero block keeps absmax 0 and the zero level).  Returns ``(codes uint8 [n], absmax
    float32 [n / block_size])``; ``block_size`` must divide ``n``.  The error of an element is
    at most half the gap between the two levels around it, times its block's abs-max.
    """
    _check_grid(grid, BLOCK_GRIDS, "quantize_blocks")
    w = np.asarray(w, np.float32).reshape(-1)
    block_size = _check_block(w.size, block_size, "the kernel")
    blocks = w.reshape(-1, block_size)
    absmax = np.max(np.abs(blocks), axis=1)
    normalised = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
    levels = grid_levels(grid)
    codes = np.searchsorted((levels[1:] + levels[:-1]) / 2, normalised)
    return codes.astype(np.uint8).reshape(-1), absmax.astype(np.float32)


def dequantize_blocks(codes, absmax, grid: str, shape):
    """``absmax_block * L[codes]`` reshaped to ``shape`` (float32; jit-able): the inverse of
    `quantize_blocks` (the block size is ``codes.size / absmax.size``)."""
    _check_grid(grid, BLOCK_GRIDS, "dequantize_blocks")
    absmax = jnp.asarray(absmax, jnp.float32)
    values = jnp.asarray(grid_levels(grid))[jnp.asarray(codes).astype(jnp.int32)]
    return (values.reshape(absmax.size, -1) * absmax[:, None]).reshape(shape)


class DoubleQuant(NamedTuple):
    """Block abs-maxes in 8 bits: ``absmax ~ codes * scales[block] + offset``."""

    codes: np.ndarray    # int8 [m], in -127 .. 127
    scales: np.ndarray   # float32 [ceil(m / block_size)]
    offset: np.ndarray   # float32 scalar: the mean abs-max


def double_quantize(absmax, block_size: int = DOUBLE_QUANT_BLOCK) -> DoubleQuant:
    """QLoRA's double quantization of the block abs-maxes (section 3, "Double Quantization").

    The mean is subtracted (abs-maxes are positive, so the centred values use both signs of the
    grid) and the centred values are quantized symmetrically to int8 (``-127 .. 127``) with one
    float32 scale ``max |a - mean| / 127`` per block of ``block_size`` (the last block may be
    shorter).  The paper stores these second-level values as FP8; we use int8, which costs the
    same 8 bits: the centred abs-maxes have no outliers to spare a floating-point grid for, the
    uniform grid bounds the error of every one by half a step (FP8 E4M3 keeps 3 mantissa bits,
    a relative error up to 1/16 at the block's largest values), and int8 arithmetic exists on
    every backend.  Error per abs-max: at most ``scale / 2`` of its block.
    """
    a = np.asarray(absmax, np.float32).reshape(-1)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"double_quantize: block_size must be an int >= 1, got {block_size!r}")
    offset = np.float32(a.mean()) if a.size else np.float32(0)
    centred = a - offset
    nblocks = math.ceil(a.size / block_size)
    padded = np.zeros(nblocks * block_size, np.float32)
    padded[:a.size] = centred
    r = np.max(np.abs(padded.reshape(nblocks, block_size)), axis=1)
    scales = np.where(r > 0, r * np.float32(1 / _DQ_MAX), 1.0).astype(np.float32)
    codes = np.clip(np.round(centred / np.repeat(scales, block_size)[:a.size]), -_DQ_MAX, _DQ_MAX)
    return DoubleQuant(codes.astype(np.int8), scales, np.asarray(offset, np.float32))


def double_dequantize(dq: DoubleQuant, block_size: int = DOUBLE_QUANT_BLOCK):
    """The abs-maxes of a `DoubleQuant` made with ``block_size``: ``codes * scales[block] +
    offset`` (float32; jit-able)."""
    codes = jnp.asarray(dq.codes)
    scales = jnp.asarray(dq.scales, jnp.float32)
    if scales.size != -(-codes.size // block_size):
        raise ValueError(f"double_dequantize: {codes.size} codes in blocks of {block_size} need "
                         f"{-(-codes.size // block_size)} scales, got {scales.size}; pass the block_size "
                         f"given to double_quantize")
    per = jnp.repeat(scales, block_size, total_repeat_length=scales.size * block_size)[:codes.size]
    return codes.astype(jnp.float32) * per + jnp.asarray(dq.offset, jnp.float32)


# ----------------------------------------------------------------------------- the packed Linear
class QuantizedBase(nnx.Variable):
    """A variable of QLoRA's frozen base (packed codes, scales, the frozen bias).  Not an
    ``nnx.Param``: parameter filters, optimizers and gradients never select it."""


def _unpack4(packed, n: int):
    """4-bit fields of `efficient_nlp.quant.packing` (unsigned, low nibble first) -> uint8 [n]."""
    packed = jnp.asarray(packed)
    return jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:n]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static description of a packed kernel (hashable: a custom_vjp's non-differentiable input)."""

    grid: str
    shape: tuple
    double_quant_block: int | None  # None: plain float32 abs-maxes (or LSQ steps)
    quantizer: object = None        # the QAT weight quantizer (grid "lsq")


def _dequantize(base: tuple, layout: _Layout, after=None):
    """The float32 kernel of the arrays of `PackedLinear._base`.

    ``after``: an array the result is made to depend on, its value unchanged: the packed codes
    get ``+ (0 * after[0] != 0)``, a zero that the compiler cannot see is one (a non-finite
    ``after[0]`` is read as 0).  The kernel is then unpacked and dequantized only once ``after``
    exists, next to the matmul that uses it.  Without this, XLA unpacks every layer's codes at the
    start of the program, as they depend on the weights only, and merges the backward pass's
    recomputation with the forward pass's (common-subexpression elimination): every layer's
    float kernel would be alive at once.  An optimization barrier, jax.checkpoint's guard, is not
    enough: the CPU compiler removes barriers before its last CSE pass.
    """
    packed = base[0]
    if after is not None:
        v = jnp.sum(jnp.ravel(after)[:1]).astype(jnp.float32)
        packed = packed + (0 * jnp.where(jnp.isfinite(v), v, 0) != 0).astype(packed.dtype)
    idx = _unpack4(packed, math.prod(layout.shape))
    if layout.grid == "lsq":
        codes = (idx.astype(jnp.int8) - 2 ** (_LSQ_BITS - 1)).reshape(layout.shape)
        return dequantize_weight(layout.quantizer, codes, base[1])
    absmax = (base[1] if layout.double_quant_block is None
              else double_dequantize(DoubleQuant(*base[1:]), layout.double_quant_block))
    return dequantize_blocks(idx, absmax, layout.grid, layout.shape)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _packed_matmul(x, base, layout):
    return jnp.dot(x, _dequantize(base, layout, after=x).astype(x.dtype))


def _packed_matmul_fwd(x, base, layout):
    return _packed_matmul(x, base, layout), base


def _packed_matmul_bwd(layout, base, g):
    w = _dequantize(base, layout, after=g).astype(g.dtype)
    return jnp.dot(g, w.T), jax.tree.map(_zero_cotangent, base)


_packed_matmul.defvjp(_packed_matmul_fwd, _packed_matmul_bwd)


class PackedLinear(nnx.Module):
    """A frozen Linear stored in 4 bits: ``y = x @ dequantize() + bias``.

    Holds, as `QuantizedBase` variables, ``codes`` (the level indices of the ``[d_in, d_out]``
    kernel in C order, packed two per byte), the scales (``absmax`` float32 per block; or with
    double quantization ``absmax_codes`` int8, ``absmax_scales`` float32 and ``absmax_offset``;
    or for the ``lsq`` grid the QAT ``step``) and the ``bias``.  Build one with `from_linear`
    or `from_quant_linear`.  ``__call__`` recomputes the kernel in the backward pass instead of
    saving it (module docstring).
    """

    def __init__(self, codes, scales: dict, *, grid: str, shape, bias=None, dtype=None, param_dtype=jnp.float32,
                 block_size: int | None = None, double_quant_block: int | None = None, quantizer=None):
        """``codes``: uint8 level indices (``0 .. 15``) of the kernel of ``shape``; ``scales``:
        name -> array (the attributes listed in the class docstring)."""
        _check_grid(grid, GRIDS, "PackedLinear")
        self.in_features, self.out_features = (int(s) for s in shape)
        self.grid = grid
        self.block_size = block_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        self._layout = _Layout(grid, (self.in_features, self.out_features), double_quant_block, quantizer)
        self.codes = QuantizedBase(jnp.asarray(pack(np.asarray(codes), 4, signed=False)))
        self._scale_names = tuple(scales)
        for name, value in scales.items():
            setattr(self, name, QuantizedBase(jnp.asarray(value)))
        self.bias = None if bias is None else QuantizedBase(jnp.asarray(bias))

    @classmethod
    def from_linear(cls, linear: nnx.Linear, grid: str = "nf4", block_size: int = 64, double_quant: bool = True):
        """The packed form of a float ``nnx.Linear`` on a block grid (``nf4`` | ``int4``)."""
        _check_grid(grid, BLOCK_GRIDS, "PackedLinear.from_linear")
        kernel = np.asarray(jax.device_get(linear.kernel[...]))
        codes, absmax = quantize_blocks(kernel, grid, block_size)
        if double_quant:
            dq = double_quantize(absmax)
            scales = {"absmax_codes": dq.codes, "absmax_scales": dq.scales, "absmax_offset": dq.offset}
        else:
            scales = {"absmax": absmax}
        bias = None if linear.bias is None else linear.bias[...]
        return cls(codes, scales, grid=grid, shape=kernel.shape, bias=bias, dtype=linear.dtype,
                   param_dtype=kernel.dtype, block_size=block_size,
                   double_quant_block=DOUBLE_QUANT_BLOCK if double_quant else None)

    def _base(self) -> tuple:
        return (self.codes[...],) + tuple(getattr(self, n)[...] for n in self._scale_names)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored kernel: packed codes and scales (the bias is not counted)."""
        return train.tree_bytes(self._base())

    def dequantize(self):
        """The float32 kernel ``[d_in, d_out]`` the codes and scales stand for."""
        return _dequantize(self._base(), self._layout)

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x, self.param_dtype)
        y = _packed_matmul(jnp.asarray(x, dtype), self._base(), self._layout)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def from_quant_linear(qlinear: M.QuantLinear) -> PackedLinear:
    """The ``lsq`` packed form of a quantization-aware trained `QuantLinear`.

    Its weight quantizer must be a signed 4-bit ``uniform`` or ``lsq`` grid (per tensor, per
    output channel or per group) and it must not quantize its input (the base is weight-only).
    The codes are the QAT codes (`efficient_nlp.quant.export.weight_codes`) and the scales its
    steps (``uniform``: the abs-max scales of the current weight), so `PackedLinear.dequantize`
    equals the fake-quantized weight ``qlinear.weight_quant(qlinear.kernel)`` bit for bit.
    """
    if not isinstance(qlinear, M.QuantLinear):
        raise ValueError(f"from_quant_linear needs a QuantLinear (a quantization-aware trained site), got "
                         f"{type(qlinear).__name__}; pack a float nnx.Linear with grid 'nf4' or 'int4'")
    wq = qlinear.weight_quant
    q = None if wq is None else wq.quantizer
    if q is None or q.method not in ("uniform", "lsq") or q.bits != _LSQ_BITS or not q.signed:
        got = "no weight quantizer (a float site)" if q is None else f"the weight quantizer {q.name}"
        raise ValueError(f"{qlinear.site}: grid 'lsq' packs a signed 4-bit uniform or LSQ weight grid, got {got}; "
                         f"quantize with quant.make_spec(4, ..., weight_method='lsq') or use grid 'nf4'")
    if qlinear.input_quant is not None:
        raise ValueError(f"{qlinear.site}: the site also quantizes its input ({qlinear.input_quant.quantizer.name}); "
                         f"the QLoRA base is weight-only: quantization-aware train with float activations "
                         f"(make_spec(4, ..., a_bits=16))")
    c = weight_codes(wq, qlinear.kernel[...])
    kernel = qlinear.kernel[...]
    codes = np.asarray(c["codes"]).astype(np.int16) + 2 ** (_LSQ_BITS - 1)
    bias = None if qlinear.bias is None else qlinear.bias[...]
    return PackedLinear(codes.astype(np.uint8), {"step": c["scale"]}, grid="lsq", shape=kernel.shape, bias=bias,
                        dtype=qlinear.dtype, param_dtype=kernel.dtype, quantizer=q)


# ----------------------------------------------------------------------------- the model transform
@dataclasses.dataclass(frozen=True)
class QLoraReport:
    """What `quantize_base` packed: ``sites`` (module paths), ``params`` (kernel elements),
    ``packed_bytes`` (codes + scales) against ``float_bytes`` (the kernels in float32); biases,
    embeddings and the head stay float and are in neither."""

    grid: str
    block_size: int | None
    double_quant: bool
    sites: tuple
    params: int
    packed_bytes: int
    float_bytes: int

    @property
    def bits_per_param(self) -> float:
        """Stored bits per kernel element, scales included (4.127 for NF4, blocks of 64, double
        quantization; 4.5 without)."""
        return 8 * self.packed_bytes / max(self.params, 1)

    def __str__(self):
        if self.grid == "lsq":
            how = "QAT steps"
        else:
            how = f"blocks of {self.block_size}, " + ("double-quantized scales" if self.double_quant
                                                       else "float32 scales")
        return (f"QLoRA base {self.grid} ({how}): {len(self.sites)} Linear sites, {self.params:,} weights, "
                f"{_size(self.float_bytes)} float32 -> {_size(self.packed_bytes)} packed "
                f"({self.bits_per_param:.3f} bits/weight, {self.float_bytes / max(self.packed_bytes, 1):.2f}x smaller); "
                f"embeddings, biases and the head stay float")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def quantize_base(model, *, grid: str = "nf4", block_size: int = 64, double_quant: bool = True,
                  roles=F.LAYER_ROLES) -> tuple:
    """A copy of ``model`` whose layer-stack Linears of ``roles`` are `PackedLinear` (QLoRA's
    frozen 4-bit base), and a `QLoraReport`; ``model`` is unchanged.

    ``grid`` ``nf4`` / ``int4`` packs float ``nnx.Linear`` sites in blocks of ``block_size``
    (with double-quantized scales when ``double_quant``); ``lsq`` packs the `QuantLinear` sites
    of a 4-bit quantization-aware trained model on their own grid (`from_quant_linear`).  The
    embeddings and the head are left as they are.  Quantize the base before adding LoRA.
    """
    _check_grid(grid, GRIDS, "quantize_base")
    unknown = sorted(set(roles) - set(F.LAYER_ROLES))
    if unknown or isinstance(roles, str):
        raise ValueError(f"quantize_base: unknown role(s) {unknown or roles!r}; roles are a sequence of "
                         f"{F.LAYER_ROLES}")
    model = train.copy_model(model)
    sites = F.sites(model, tuple(roles), unique=True)
    if not sites:
        raise ValueError(f"quantize_base: the model has no site of the roles {tuple(roles)} (its family has "
                         f"{sorted(F.family_of(model).layer_sites)})")
    packed_bytes = params = 0
    for site in sites:
        mod = F.get_module(model, site.path)
        if grid == "lsq" and isinstance(mod, M.QuantLinear):
            new = from_quant_linear(mod)
        elif grid != "lsq" and type(mod) is nnx.Linear:
            new = PackedLinear.from_linear(mod, grid, block_size, double_quant)
        elif grid == "lsq":
            raise ValueError(f"{site.path} is a {type(mod).__name__}; grid 'lsq' packs the QuantLinear sites of a "
                             f"4-bit quantization-aware trained model (quant.quantize_model, then training); "
                             f"pack a float model with grid 'nf4' or 'int4'")
        else:
            raise ValueError(f"{site.path} is a {type(mod).__name__}; grid {grid!r} packs float nnx.Linear "
                             f"sites: quantize the base before adding LoRA, or use grid 'lsq' for the "
                             f"QuantLinear sites of a quantization-aware trained model")
        F.set_module(model, site.path, new)
        packed_bytes += new.nbytes
        params += new.in_features * new.out_features
    report = QLoraReport(grid, None if grid == "lsq" else int(block_size), bool(double_quant) and grid != "lsq",
                         tuple(s.path for s in sites), params, packed_bytes, 4 * params)
    return model, report


__all__ = ["BLOCK_GRIDS", "DOUBLE_QUANT_BLOCK", "DoubleQuant", "GRIDS", "PackedLinear", "QLoraReport",
           "QuantizedBase", "dequantize_blocks", "double_dequantize", "double_quantize", "from_quant_linear",
           "grid_levels", "nf4_levels", "quantize_base", "quantize_blocks"]
