"""Quantized bases in memory: load mlx-lm's quantized checkpoints, quantize a float model on load,
and describe what a loaded model holds (the record an adapter keeps of its base)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from returns.result import Failure, Result, Success

from finetune.core import quantization
from finetune.core.quantization import Params, Quant
from finetune.engines.mlx import quantized_cpu
from finetune.files import weights
from finetune.files.weights import cast_weights

_FLOAT = (nn.Linear, nn.Embedding)
_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def in_dims(model: nn.Module) -> dict[str, int]:
    """Input width of every float linear and embedding (the modules mlx-lm's quantize touches)."""
    return {p: m.weight.shape[-1] for p, m in model.named_modules() if isinstance(m, _FLOAT) and p}


def layers(model: nn.Module) -> dict[str, Params | None]:
    """Every quantizable module's quantization (None = float); LoRA wrappers are looked through."""
    out: dict[str, Params | None] = {}
    for path, m in model.named_modules():
        path = path.removesuffix(".linear")  # a LoRALinear's base
        if isinstance(m, _QUANTIZED):
            out[path] = Params(group_size=m.group_size, bits=m.bits, mode=m.mode)
        elif isinstance(m, _FLOAT) and path:
            out[path] = None
    return out


def unpacked_parameters(model: nn.Module) -> int:
    """Every parameter as the float checkpoint counts it: a quantized weight by its unpacked
    elements, its scales and biases not at all."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, _QUANTIZED):
            packing = [m.weight.size, m.scales.size, m.get("biases", mx.zeros(0)).size]
            total += m.weight.size * 32 // m.bits - sum(packing)
    return total


def describe(model: nn.Module) -> Quant | None:
    """The model's quantization in canonical form (None when nothing is quantized)."""
    return quantization.describe(layers(model))


def apply(model: nn.Module, plan: Mapping[str, Params]) -> nn.Module:
    """Quantize the planned modules in place (mx.quantize's kernels, as mlx-lm does)."""
    nn.quantize(model, class_predicate=lambda p, _: plan[p].as_dict() if p in plan else False)
    return quantized_cpu.use_dense_on_cpu(model)  # MLX-CPU's quantized matmul is not BLAS-backed


def quantize_on_load(model: nn.Module, quant: Quant, flag: str) -> Result[nn.Module, str]:
    """A float model quantized like `mlx_lm convert -q` would (every divisible module unless overridden)."""
    plan = quantization.load_plan(quant, in_dims(model), flag)
    result = plan.map(lambda p: apply(model, p))
    if isinstance(result, Success):
        for _, m in model.named_modules():  # one layer at a time: its float weight is freed at once
            if isinstance(m, _QUANTIZED):
                mx.eval(m.parameters())
        mx.eval(model.parameters())
    return result


def load_stored(
    model: nn.Module, directory: Path, config: Mapping[str, Any], quant: Quant, dtype: str, spec: str
) -> Result[nn.Module, str]:
    """Load an mlx-lm quantized checkpoint into `model` (built float from the config)."""
    match weights.read_checkpoint(directory):
        case Success(raw):
            pass
        case failure:
            return failure
    tensors = quantization.mlx_names(str(config.get("model_type")), raw)
    stored = {
        k.removesuffix(".scales"): (tuple(tensors[k.removesuffix(".scales") + ".weight"].shape), tuple(v.shape))
        for k, v in tensors.items() if k.endswith(".scales") and k.removesuffix(".scales") + ".weight" in tensors
    }
    match quantization.stored_plan(quant, in_dims(model), stored, f"{spec}"):
        case Success(plan):
            pass
        case failure:
            return failure
    apply(model, plan)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    unknown, missing = sorted(tensors.keys() - expected.keys()), sorted(expected.keys() - tensors.keys())
    if unknown or missing:
        what = f"unknown keys {', '.join(unknown[:5])}" if unknown else f"missing keys {', '.join(missing[:5])}"
        return Failure(f"{spec}: quantized checkpoint does not match its config: {what}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            return Failure(f"{spec}: shape mismatch for {k}: expected {shape}, got {tuple(tensors[k].shape)}")
    try:
        model.load_weights(list(cast_weights(tensors, getattr(mx, dtype)).items()), strict=True)
        mx.eval(model.parameters())
    except (ValueError, RuntimeError) as err:  # damage that only shows when tensors are read
        return Failure(f"{spec}: cannot load weights from {directory} ({err})")
    return Success(model)


def codes(model: nn.Module) -> dict[str, bytes]:
    """Every quantized module's packed words, scales and biases (float32): `quantization.codes_digest`'s input."""
    import numpy as np

    def raw(m: nn.Module) -> bytes:
        parts = [m.weight, m.scales, *([m["biases"]] if m.get("biases") is not None else [])]
        return b"".join(np.array(p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p).tobytes() for p in parts)

    return {p.removesuffix(".linear"): raw(m) for p, m in model.named_modules() if isinstance(m, _QUANTIZED)}


def check_record(model: nn.Module, want: Quant | None, adapter: str, digest: str = "") -> Result[nn.Module, str]:
    """The base must be quantized exactly as the adapter's record says it was in training (and,
    when the record has a digest, hold the same quantized weights)."""
    have = quantization.codes_digest(codes(model)) if digest else ""
    refusal = quantization.base_mismatch(want, describe(model), adapter, digest, have)
    return Failure(refusal) if refusal else Success(model)
