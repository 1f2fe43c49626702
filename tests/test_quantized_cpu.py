"""Quantized layers on the CPU compute dense (dequantize, then BLAS) with MLX's kernel's results,
their gradient, and without keeping float copies of the weights for the backward pass."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from finetune.engines.mlx import quantized_cpu

MODES = [("affine", 64, 4), ("affine", 32, 8), ("affine", 128, 2), ("mxfp4", None, None), ("nvfp4", None, None)]


def quantized(mode: str, group_size: int | None, bits: int | None, fan_in: int = 256, fan_out: int = 384, bias: bool = True):
    mx.random.seed(1)
    kwargs = {"group_size": group_size, "bits": bits} if mode == "affine" else {}
    kernel = nn.QuantizedLinear.from_linear(nn.Linear(fan_in, fan_out, bias=bias), mode=mode, **kwargs)
    holder = nn.Module()
    holder.layer = kernel
    dense = quantized_cpu.use_dense_on_cpu(holder).layer
    assert type(dense) is quantized_cpu.QuantizedLinear and isinstance(dense, nn.QuantizedLinear)
    assert dense["weight"] is kernel["weight"] and dense.mode == kernel.mode  # the same arrays, not copies
    return kernel, dense


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(("mode", "group_size", "bits"), MODES)
def test_dense_path_gives_the_kernels_outputs_and_input_gradients(mode, group_size, bits):
    kernel, dense = quantized(mode, group_size, bits)
    x = mx.random.normal((2, 16, 256))
    assert rel(dense(x), kernel(x)) < 1e-5

    def loss(layer):
        return lambda x: (layer(x) ** 2).sum()

    want = mx.grad(loss(kernel))(x)
    assert rel(mx.grad(loss(dense))(x), want) < 1e-5
    assert rel(mx.compile(mx.grad(loss(dense)))(x), want) < 1e-5


def test_few_rows_and_half_precision_keep_the_kernel_bit_for_bit():
    kernel, dense = quantized("affine", 64, 4)
    one = mx.random.normal((1, 256))  # token-by-token generation: the kernel is faster there
    assert mx.array_equal(dense(one), kernel(one))
    half = mx.random.normal((8, 256)).astype(mx.bfloat16)  # mlx-lm's rounding in half precision
    assert mx.array_equal(dense(half), kernel(half))


def test_a_tied_quantized_head_is_dense_too():
    mx.random.seed(2)
    table = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 128), group_size=64, bits=4)
    holder = nn.Module()
    holder.embed = table
    fast = quantized_cpu.use_dense_on_cpu(holder).embed
    assert type(fast) is quantized_cpu.QuantizedEmbedding
    ids = mx.array([[1, 5, 299]])
    assert mx.array_equal(fast(ids), table(ids))
    h = mx.random.normal((6, 128))
    assert rel(fast.as_linear(h), table.as_linear(h)) < 1e-5


def test_the_backward_pass_keeps_no_float_copies():
    """Eight 1024x1024 4-bit layers: the dense path's peak stays near the kernel's, far from the
    8 x 4 MB of float32 weights it would hold if each layer kept its dense copy for the backward."""
    layers = [quantized("affine", 64, 4, 1024, 1024, bias=False) for _ in range(8)]
    x = mx.random.normal((64, 1024))
    mx.eval(x, [k.parameters() for k, _ in layers])

    def peak(which: int) -> int:
        def loss(x):
            for pair in layers:
                x = mx.tanh(pair[which](x))
            return x.sum()

        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss)(x))
        return mx.get_peak_memory() - base

    kernel, dense = peak(0), peak(1)
    one_layer = 1024 * 1024 * 4
    assert dense < kernel + 4 * one_layer, (kernel, dense)  # measured: kernel + 2.75 layers; all 8 kept: + 8.7
