"""Real bit-packing of integer codes for stored size.

Host-side NumPy (exports run on the host).  Codes of ``bits`` in {1, 2, 4, 8} are packed
``8 // bits`` per byte into a flat ``uint8`` array, in C (row-major) order of the code tensor;
inside a byte, code ``j`` (0-based) occupies bits ``[j*bits, (j+1)*bits)`` counting from the least
significant bit (little-endian within the byte).  The last byte is zero-padded.  Other widths
(3, 5, 6, 7 bits) are stored at the next supported width: a signed 3-bit code fits the signed
4-bit range, so ``pack(codes, 4)`` stores it.

What a stored field holds (``signed=True``, the default, for the int8 codes of
`efficient_nlp.quant.quantizers`):

* ``bits >= 2``: offset binary, ``field = code + 2^(b-1)`` for codes in ``[-2^(b-1), 2^(b-1) - 1]``
  (e.g. ternary codes {-1, 0, 1} at 2 bits -> {1, 2, 3}; 8-bit codes -> ``code + 128``, not two's
  complement);
* ``bits == 1``: binary codes {-1, +1} -> {0, 1} (``field = (code + 1) / 2``), as from
  `binary_codes`.

``signed=False`` stores unsigned codes in ``[0, 2^b - 1]`` as they are (``unpack`` then returns
uint8).  Codes out of range are an error, never silently wrapped.
"""
from __future__ import annotations

import math

import numpy as np

PACK_BITS = (1, 2, 4, 8)


def _check_bits(bits, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in PACK_BITS:
        raise ValueError(f"{fn}: bits must be one of {PACK_BITS}, got {bits!r}; store 3-bit codes "
                         f"with bits=4 and 5..7-bit codes with bits=8")
    return int(bits)


def _field_range(bits: int, signed: bool) -> tuple[int, int]:
    if not signed:
        return 0, 2 ** bits - 1
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` take when packed: ``ceil(numel / (8 // bits))``."""
    bits = _check_bits(bits, "packed_nbytes")
    if isinstance(numel, bool) or not isinstance(numel, (int, np.integer)) or numel < 0:
        raise ValueError(f"packed_nbytes: numel must be a non-negative int, got {numel!r}")
    return math.ceil(int(numel) / (8 // bits))


def pack(codes, bits, signed=True) -> np.ndarray:
    """Packs integer ``codes`` (any shape, C order) into a 1-D ``uint8`` array.

    ``signed=True``: codes in ``[-2^(b-1), 2^(b-1) - 1]`` (``{-1, +1}`` at 1 bit), stored with the
    offsets of the module docstring; ``signed=False``: codes in ``[0, 2^b - 1]`` stored as they
    are.  The result has `packed_nbytes` ``(codes.size, bits)`` bytes; keep the shape to unpack.
    """
    bits = _check_bits(bits, "pack")
    codes = np.asarray(codes)
    if not (np.issubdtype(codes.dtype, np.integer) or codes.dtype == np.bool_):
        raise ValueError(f"pack: codes must have an integer dtype, got {codes.dtype}; convert the "
                         f"float codes with .astype(np.int8) after checking they are integral")
    flat = codes.reshape(-1).astype(np.int64)
    lo, hi = _field_range(bits, signed)
    if flat.size:
        bad = (flat < lo) | (flat > hi)
        if bits == 1 and signed:
            bad |= flat == 0
        if bad.any():
            allowed = "{-1, +1}" if (bits == 1 and signed) else f"[{lo}, {hi}]"
            if not signed:
                hint = ""
            elif bits == 1:
                hint = (" (unsigned codes? pass signed=False; 1-bit unsigned uniform codes {-1, 0}: "
                        "pack(codes + 1, 1, signed=False))")
            else:
                hint = " (unsigned codes? pass signed=False)"
            raise ValueError(f"pack: {int(bad.sum())} code(s) outside the {'signed' if signed else 'unsigned'} "
                             f"{bits}-bit range {allowed}, e.g. {int(flat[bad][0])}{hint}")
    if signed:
        fields = (flat + 1) // 2 if bits == 1 else flat + 2 ** (bits - 1)
    else:
        fields = flat
    fields = fields.astype(np.uint8)
    per = 8 // bits
    pad = (-fields.size) % per
    if pad:
        fields = np.concatenate([fields, np.zeros(pad, np.uint8)])
    fields = fields.reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out = np.bitwise_or.reduce(np.left_shift(fields, shifts[None, :]), axis=1) if per > 1 else fields[:, 0]
    return np.ascontiguousarray(out, dtype=np.uint8)


def unpack(packed, bits, shape, signed=True) -> np.ndarray:
    """Inverse of `pack`: the codes of ``shape`` (an int or a tuple), ``int8`` when ``signed``
    (``{-1, +1}`` at 1 bit), ``uint8`` when not."""
    bits = _check_bits(bits, "unpack")
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"unpack: packed must be a 1-D uint8 array (from pack), got "
                         f"{packed.dtype} of shape {packed.shape}")
    numel = math.prod(shape)
    need = packed_nbytes(numel, bits)
    if packed.size != need:
        raise ValueError(f"unpack: {numel} codes of {bits} bits take {need} bytes, got {packed.size}; "
                         f"check shape {shape} and bits against the pack call")
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8(2 ** bits - 1)
    fields = (np.right_shift(packed[:, None], shifts[None, :]) & mask).reshape(-1)[:numel]
    if not signed:
        return fields.astype(np.uint8).reshape(shape)
    values = fields.astype(np.int16)
    values = 2 * values - 1 if bits == 1 else values - 2 ** (bits - 1)
    return values.astype(np.int8).reshape(shape)


__all__ = ["PACK_BITS", "pack", "unpack", "packed_nbytes"]
