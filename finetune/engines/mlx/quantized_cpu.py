"""Quantized layers that train fast on the CPU: dequantize, then a BLAS matmul.

MLX-CPU's `quantized_matmul` is not BLAS-backed: a 576→1536 4-bit linear over 1024 rows takes
~2 s, while dequantizing it (~1 ms) and multiplying in float32 takes ~0.04 s. For a row or
two (token-by-token generation) the quantized kernel stays faster, so the dense path starts at
`ROWS` rows, for float32 inputs (what the CPU computes in; half-precision inputs keep MLX's
kernel and its rounding, as mlx-lm computes them). The dense weight is a temporary: the custom gradient dequantizes again for the
backward pass instead of keeping every layer's float copy alive until then, so QLoRA keeps its
memory. Parameters, names and `isinstance` are those of MLX's quantized layers; on a GPU they
run MLX's own kernels unchanged.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

ROWS = 4  # from here up the dense path wins on the CPU (measured: 1 row 0.8 vs 1.5 ms; 4 rows 3.1 vs 1.4 ms)


@cache
def _dense_matmul(group_size: int, bits: int, mode: str, biased: bool):
    """`x @ dequantize(w).T` whose gradient (for `x` only) dequantizes `w` again."""

    def dense(q: mx.array, scales: mx.array, biases: tuple[mx.array, ...], after: mx.array) -> mx.array:
        """The float32 weight, computed only once `after` is: left free, MLX's scheduler may
        dequantize every layer up front (they depend on parameters alone) and hold them all."""
        q = mx.depends(q, after)
        w = mx.dequantize(q, scales, biases[0] if biased else None, group_size=group_size, bits=bits, mode=mode)
        return w.astype(mx.float32)  # float32 products and sums, as the quantized kernel; and BLAS

    @mx.custom_function
    def matmul(x, q, scales, *biases):
        return (x.astype(mx.float32) @ dense(q, scales, biases, x).T).astype(x.dtype)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, q, scales, *biases = primals
        dx = (cotangent.astype(mx.float32) @ dense(q, scales, biases, cotangent)).astype(x.dtype)
        return dx, mx.zeros_like(q), mx.zeros_like(scales), *map(mx.zeros_like, biases)

    return matmul


def quantized_matmul(x: mx.array, layer: nn.Module) -> mx.array:
    """`x @ W.T` for a quantized layer's `W` (no bias): dense on the CPU for `ROWS`+ float32 rows."""
    biases = layer.get("biases")
    if x.size // max(x.shape[-1], 1) < ROWS or x.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return mx.quantized_matmul(x, layer["weight"], scales=layer["scales"], biases=biases, transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    matmul = _dense_matmul(layer.group_size, layer.bits, layer.mode, biases is not None)
    return matmul(x, layer["weight"], layer["scales"], *(() if biases is None else (biases,)))


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:  # a tied output head
        return quantized_matmul(x, self)


_FASTER = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}


def use_dense_on_cpu(model: nn.Module) -> nn.Module:
    """Swap MLX's quantized layers in `model` for these (same arrays, nothing copied); in place."""
    swaps = []
    for path, m in model.named_modules():
        faster = _FASTER.get(type(m))
        if faster is not None:
            new = faster.__new__(faster)
            dict.update(new, m)  # the arrays (weight, scales, biases, bias)
            new.__dict__.update(m.__dict__)  # group_size, bits, mode, frozen state
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model
