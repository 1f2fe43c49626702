"""Float dtypes on NumPy alone, bfloat16 included (pure).

NumPy has no bfloat16, so a BF16 tensor is held as `BF16`, a structured dtype over the two bytes
of each raw word: renames, transposes and writes keep its bits, while arithmetic and `astype` on it
fail loudly (two fields: NumPy will not cast it to a number), and `as_float32`/`cast` convert it
exactly (widening) or by round-to-nearest-even (narrowing), as MLX and torch do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

BF16 = np.dtype([("bfloat16_low", "u1"), ("bfloat16_high", "u1")])  # little-endian words
FLOATS = ("float32", "float16", "bfloat16")


def name(a: np.ndarray) -> str:
    """`float32`, `bfloat16`, `uint32`, ...: the names MLX, torch and config.json use."""
    return "bfloat16" if a.dtype == BF16 else a.dtype.name


def is_float(a: np.ndarray) -> bool:
    return a.dtype == BF16 or bool(np.issubdtype(a.dtype, np.floating))


def as_float32(a: np.ndarray) -> np.ndarray:
    """Any float array widened to float32 (exact for bfloat16 and float16); float32 as it is."""
    if a.dtype == BF16:
        return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float array in `dtype` (`float32`, `float16` or `bfloat16`), rounded to nearest even."""
    if name(a) == dtype:
        return a
    if dtype != "bfloat16":
        with np.errstate(over="ignore"):  # out of float16's range: inf, as MLX and torch give
            return as_float32(a).astype(dtype)
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # stays a (quiet) NaN
    return rounded.view(BF16)


def rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `a` rounded to `dtype` and widened back: one operation's result in that dtype."""
    return a if dtype == "float32" else as_float32(cast(a, dtype))


def cast_floats(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Float tensors cast to `dtype`; integer tensors (quantized data) kept as they are."""
    return {k: cast(v, dtype) if is_float(v) else v for k, v in tensors.items()}
