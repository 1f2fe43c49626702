"""`LoRALinear`: a frozen base linear plus trainable low-rank factors, swapped into a model."""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from finetune.core import lora


class LoRALinear(nn.Module):
    """`y = linear(x) + scale · (dropout(x) A) B`; only `lora_a` and `lora_b` train."""

    def __init__(self, linear: nn.Module, a: mx.array, b: mx.array, scale: float, dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        self.lora_a = a  # (in, r)
        self.lora_b = b  # (r, out)
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        self.linear.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        z = lora.update(self.dropout(x), self.lora_a, self.lora_b, self.scale)  # (..., out)
        return self.linear(x) + z.astype(x.dtype)


def linear_shapes(model: nn.Module, paths: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """`{path: (in, out)}` for the named `nn.Linear` modules; unknown paths raise KeyError."""
    modules = dict(model.named_modules())
    out = {}
    for path in paths:
        module = modules.get(path)
        if not isinstance(module, nn.Linear | nn.QuantizedLinear):
            raise KeyError(f"{path} is not a linear layer of this model")
        fan_out, fan_in = module.weight.shape
        if isinstance(module, nn.QuantizedLinear):
            fan_in = fan_in * 32 // module.bits
        out[path] = (fan_in, fan_out)
    return out


def attach(model: nn.Module, params: Mapping[str, mx.array], scale: float, dropout: float = 0.0, dora: bool = False) -> nn.Module:
    """Wrap every linear named in `params` (`<path>.lora_a/b`) in a LoRALinear, or a DoRALinear
    where `params` holds its magnitude `<path>.m` (or `dora`: `m` starts at the base's row norms);
    freeze the rest."""
    from finetune.engines.mlx.dora import DoRALinear, row_norms

    model.freeze()
    modules = dict(model.named_modules())
    swaps = []
    for name, a in params.items():
        if not name.endswith(".lora_a"):
            continue
        path = name[: -len(".lora_a")]
        base, b = modules[path], params[f"{path}.lora_b"]
        if dora or f"{path}.m" in params:
            m = params.get(f"{path}.m")
            swaps.append((path, DoRALinear(base, a, b, row_norms(base) if m is None else m, scale, dropout)))
        else:
            swaps.append((path, LoRALinear(base, a, b, scale, dropout)))
    model.update_modules(tree_unflatten(swaps))
    return model


def block_linears(model: nn.Module) -> tuple[str, ...]:
    """Key paths of the linear layers inside one block, sorted."""
    return tuple(sorted(k for k, m in model.layers[0].named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)))


def layers_prefix(model: nn.Module) -> str:
    """Where the blocks live: `model.layers` (Llama family) or `transformer.h` (GPT-2)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first:
            return path.rsplit(".", 1)[0]
    raise AssertionError("the model's first block is not among its modules")
