"""mlx-lm's affine quantization on NumPy (pure): pack, unpack, quantize, dequantize.

The layout is MLX's: per row, groups of `group_size` weights share a scale and a bias
(`w ≈ scale · q + bias`, q in [0, 2^bits)); the q are a little-endian bit stream in uint32 words.
`quantize` follows `mx.quantize`'s rule step for step in float32 (the scale's sign picks the edge
of larger magnitude, which is then represented exactly), so its output equals MLX's bit for bit
for 2 to 8 bits (MLX's 1-bit rule differs: not replicated); tests compare the two over every such
bit width and group size.
"""

from __future__ import annotations

import numpy as np

from finetune.core import dtypes

_EPS = np.float32(1e-7)  # smallest scale, for constant groups


def unpack(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Packed uint32 words (little-endian bit stream per row) -> `width` integers per row."""
    stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=-1, bitorder="little")
    digits = stream[..., : width * bits].reshape(*packed.shape[:-1], width, bits).astype(np.uint32)
    return (digits << np.arange(bits, dtype=np.uint32)).sum(-1, dtype=np.uint32)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers below 2^bits per row -> uint32 words (a row's bits must fill whole words)."""
    digits = ((q[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = digits.reshape(*q.shape[:-1], q.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little").view(np.uint32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """`scales · q + biases` per group, as float32 holding `mx.dequantize`'s values exactly: it
    rounds after the product and after the sum to the scales' dtype, and so does this."""
    dtype = dtypes.name(scales)
    width = packed.shape[-1] * 32 // bits
    s = np.repeat(dtypes.as_float32(scales), group_size, axis=-1)
    b = np.repeat(dtypes.as_float32(biases), group_size, axis=-1)
    return dtypes.rounded(dtypes.rounded(s * unpack(packed, bits, width).astype(np.float32), dtype) + b, dtype)


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
    q = np.clip(np.rint((x - bias[..., None]) / scale[..., None]), 0, top).astype(np.uint32)
    dtype = dtypes.name(w)
    return pack(q.reshape(w.shape), bits), dtypes.cast(scale, dtype), dtypes.cast(bias, dtype)
