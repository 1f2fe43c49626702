"""`DoRALinear`: weight-decomposed LoRA (Liu et al. 2024) in mlx-lm's layout.

The adapted weight `W' = W + scale · (A B)ᵀ` is (out, in); DoRA rescales each of its output rows to
a learned magnitude `m` (out,): `y = m / ‖W'‖_row · (x Wᵀ + scale · (x A) B) + bias`, the norm
taken without gradient (as mlx-lm and PEFT do). `m` starts as the row norms of `W`, so a fresh
adapter (B = 0) leaves the layer unchanged. Trainable: `lora_a`, `lora_b`, `m`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from finetune.core import lora
from finetune.engines.mlx.lora import LoRALinear


def dense_weight(linear: nn.Module) -> mx.array:
    """The (out, in) float weight of a linear, dequantized when it is quantized."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"),
            group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
        )
    return linear.weight


def row_norms(linear: nn.Module) -> mx.array:
    """`m`'s starting value: the float32 norm of each output row of the base weight."""
    return mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)


class DoRALinear(LoRALinear):
    """A LoRALinear (frozen base, factors) whose output rows are rescaled to a magnitude `m`
    (a LoRALinear to code that unwraps adapted layers: `.linear` is the base)."""

    def __init__(self, linear: nn.Module, a: mx.array, b: mx.array, m: mx.array, scale: float, dropout: float = 0.0):
        super().__init__(linear, a, b, scale, dropout)
        self.m = m  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.linear.get("bias")
        y = self.linear(x)
        if bias is not None:
            y = y - bias
        z = lora.update(self.dropout(x), self.lora_a, self.lora_b, self.scale)
        w = dense_weight(self.linear)
        adapted = w.astype(mx.float32) + lora.delta(self.lora_a, self.lora_b, self.scale)
        denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        out = (self.m / denom).astype(x.dtype) * (y + z.astype(x.dtype))
        return out + bias if bias is not None else out
