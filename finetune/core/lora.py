"""LoRA as parameter trees and pure functions (mlx-lm's layout and convention).

`lora_a` is (in, r) drawn uniform in ±1/√in, `lora_b` is (r, out) zeros, and a targeted linear
computes `y = W x + scale · (x A) B`; fusing gives `W' = W + scale · (A B)ᵀ` in (out, in) layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finetune.core.config import ALL_LINEAR

Shapes = Mapping[str, tuple[int, int]]  # module path -> (in_features, out_features)
Array = Any  # any array type with `@`, `.T` and `.astype` (NumPy, MLX, torch)


def select_layers(total: int, num_layers: int) -> range:
    """The last `num_layers` block indices (-1 = all)."""
    n = total if num_layers < 0 else min(num_layers, total)
    return range(total - n, total)


def resolve_keys(keys: Sequence[str], block_linears: Sequence[str]) -> tuple[str, ...]:
    """Expand `all-linear` into the block's linear key paths, in the block's order."""
    if ALL_LINEAR in keys:
        return tuple(block_linears)
    return tuple(keys)


def targets(prefix: str, layers: range, keys: Sequence[str]) -> tuple[str, ...]:
    """Full module paths: `{prefix}.{i}.{key}` for every adapted block and key."""
    return tuple(f"{prefix}.{i}.{k}" for i in layers for k in keys)


def init(seed: int, shapes: Shapes, rank: int) -> dict[str, np.ndarray]:
    """Fresh float32 adapters from an explicit seed, the same numbers for every engine.

    Module path number k (in sorted order) draws from its own stream `PCG64([seed, k])`.
    """
    out: dict[str, np.ndarray] = {}
    for k, path in enumerate(sorted(shapes)):
        fan_in, fan_out = shapes[path]
        bound = 1.0 / math.sqrt(fan_in)
        rng = np.random.Generator(np.random.PCG64([seed, k]))
        out[f"{path}.lora_a"] = rng.uniform(-bound, bound, (fan_in, rank)).astype(np.float32)
        out[f"{path}.lora_b"] = np.zeros((rank, fan_out), np.float32)
    return out


def delta(a: Array, b: Array, scale: float) -> Array:
    """The (out, in) weight update a LoRA pair stands for, `scale · (A B)ᵀ`, computed as `Bᵀ Aᵀ`
    (laid out (out, in) already: 3x faster in NumPy than transposing the product)."""
    return scale * (b.T @ a.T)


def fuse(weight: Array, a: Array, b: Array, scale: float) -> Array:
    """`W + scale · (A B)ᵀ`, in the weight's dtype."""
    return (weight + delta(a, b, scale)).astype(weight.dtype)


def update(x: Array, a: Array, b: Array, scale: float) -> Array:
    """The low-rank term of the forward, `scale · (x A) B` (every engine's LoRA layer calls this)."""
    return scale * ((x @ a) @ b)  # (..., in) @ (in, r) @ (r, out)


def count(shapes: Shapes, rank: int) -> int:
    """Trainable parameters: Σ r·(in + out)."""
    return sum(rank * (i + o) for i, o in shapes.values())

