"""mlx-lm's affine quantization on NumPy (pure): pack, unpack, quantize, dequantize.

The layout is MLX's: per row, groups of `group_size` weights share a scale and a bias
(`w ≈ scale · q + bias`, q in [0, 2^bits)); the q are a little-endian bit stream in uint32 words.
`quantize` follows `mx.quantize`'s rule step for step in float32 (the scale's sign picks the edge
of larger magnitude, which is then represented exactly), so its output equals MLX's bit for bit
for 2 to 8 bits (MLX's 1-bit rule differs: not replicated); tests compare the two over every such
bit width and group size.
"""

from __future__ import annotations

import math

import numpy as np

from finetune.core import dtypes

_EPS = np.float32(1e-7)  # smallest scale, for constant groups


def _chunk(bits: int) -> tuple[int, int]:
    """(bytes, values) of the smallest whole-byte run of `bits`-bit values: (1, 2) for 4 bits, (3, 8) for 3."""
    size = math.lcm(bits, 8) // 8
    return size, size * 8 // bits


def unpack(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Packed uint32 words (little-endian bit stream per row) -> `width` integers (uint8) per row."""
    size, count = _chunk(bits)
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(*packed.shape[:-1], -1, size)
    kind = np.uint8 if size == 1 else np.uint32 if size <= 4 else np.uint64
    word = raw[..., 0].astype(kind)
    for k in range(1, size):  # the chunk's bytes as one little-endian integer
        word |= raw[..., k].astype(kind) << kind(8 * k)
    values = (word[..., None] >> (np.arange(count, dtype=kind) * kind(bits))) & kind(2**bits - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :width].astype(np.uint8)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers below 2^bits per row -> uint32 words (a row's bits must fill whole words)."""
    size, count = _chunk(bits)
    kind = np.uint8 if size == 1 else np.uint32 if size <= 4 else np.uint64
    values = q.reshape(*q.shape[:-1], -1, count).astype(kind)
    word = (values << (np.arange(count, dtype=kind) * kind(bits))).sum(-1, dtype=kind)  # disjoint bits: sum = or
    raw = word[..., None].astype(word.dtype.newbyteorder("<")).view(np.uint8)[..., :size]
    return np.ascontiguousarray(raw).reshape(*q.shape[:-1], -1).view(np.uint32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """`scales · q + biases` per group, as float32 holding `mx.dequantize`'s values exactly: it
    rounds after the product and after the sum to the scales' dtype, and so does this."""
    dtype = dtypes.name(scales)
    width = packed.shape[-1] * 32 // bits
    q = unpack(packed, bits, width).reshape(*packed.shape[:-1], -1, group_size)  # (..., groups, group_size)
    s, b = dtypes.as_float32(scales)[..., None], dtypes.as_float32(biases)[..., None]
    return dtypes.rounded(dtypes.rounded(s * q, dtype) + b, dtype).reshape(*packed.shape[:-1], width)


def quantize(w: np.ndarray, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed weight, scales, biases) of a float matrix (2 to 8 bits), scales and biases in its dtype."""
    assert bits >= 2, "MLX quantizes 1 bit by another rule"
    x = dtypes.as_float32(w).reshape(*w.shape[:-1], -1, group_size)  # (..., groups, group_size)
    top = np.float32(2**bits - 1)
    lo, hi = x.min(-1), x.max(-1)
    below = np.abs(lo) > np.abs(hi)  # the edge of larger magnitude gets an exact grid point
    step = np.maximum((hi - lo) / top, _EPS)
    scale = np.where(below, step, -step)
    edge = np.where(below, lo, hi)
    q0 = np.rint(edge / scale)
    moved = q0 != 0
    scale = np.where(moved, edge / np.where(moved, q0, np.float32(1)), scale).astype(np.float32)
    bias = np.where(moved, edge, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint((x - bias[..., None]) / scale[..., None]), 0, top).astype(np.uint8)
    dtype = dtypes.name(w)
    return pack(q.reshape(w.shape), bits), dtypes.cast(scale, dtype), dtypes.cast(bias, dtype)
