"""`LoRALinear`: a frozen base linear plus trainable low-rank factors, swapped into a model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import architectures, lora

if TYPE_CHECKING:
    from finetune.files.adapters import Adapter


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


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA (and DoRA) layers by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def bare(model: nn.Module) -> nn.Module:
    """`model` with every LoRA layer replaced by the linear it wraps (the base stays loaded)."""
    plain = [(path, m.linear) for path, m in adapter_layers(model).items()]
    if plain:
        model.update_modules(tree_unflatten(plain))
    return model


def attach_checked(model: nn.Module, directory: str) -> Result[nn.Module, str]:
    """An adapter directory of any format on `model`, after checking the quantized base it
    records (if any) is this one."""
    from finetune.core import quantization
    from finetune.engines.mlx.quantized import check_record
    from finetune.files.adapters import base_quantization

    def checked(record: dict | None) -> Result[nn.Module, str]:
        want = quantization.parse_block(record, directory).value_or(None) if record else None
        return check_record(model, want, directory) if record else Success(model)

    return base_quantization(directory).bind(checked).bind(lambda m: attach_adapter(m, directory))


def model_kind(model: nn.Module) -> str:
    """`gpt2` when the blocks live under `transformer.h`, else the Llama family's naming."""
    return architectures.family_of_blocks(layers_prefix(model)).family


def adapter_shapes(model: nn.Module, spec: core_adapters.AdapterSpec) -> dict[str, tuple[int, int]]:
    """`{module path: (in, out)}` of the linears an adapter with `spec` targets in `model`."""
    block = block_linears(model)
    keys = lora.resolve_keys(spec.keys or ("all-linear",), block)
    unknown = [k for k in keys if k not in block]
    if unknown:
        raise KeyError(f"{', '.join(unknown)} not in this model's blocks (has: {', '.join(block)})")
    layers = lora.select_layers(len(model.layers), spec.num_layers)
    paths = lora.targets(layers_prefix(model), layers, keys)
    return linear_shapes(model, paths)


def attach_adapter(model: nn.Module, directory: str | Path) -> Result[nn.Module, str]:
    """Load an adapter directory of any format onto `model` (frozen base, LoRA layers swapped in;
    a full fine-tune's weights loaded over the base's)."""
    from finetune.files.adapters import load_any

    match load_any(directory, full=True):
        case Failure(message):
            return Failure(message)
        case Success(adapter):
            pass
    if adapter.spec is not None and adapter.spec.fine_tune_type == "full":
        from finetune.engines.mlx.full import load_trained

        return load_trained(model, adapter)
    source = str(adapter.weights_path)
    if adapter.spec is None:  # PEFT: the tensors say which linears; check them against all of them
        block = block_linears(model)
        every = lora.targets(layers_prefix(model), range(len(model.layers)), block)
        shapes = linear_shapes(model, every)
        return core_adapters.check_shapes(adapter.params, shapes, adapter.rank, source, adapter.names).map(
            lambda _: _attached(model, adapter)
        )
    try:
        shapes = adapter_shapes(model, adapter.spec)
    except KeyError as err:
        return Failure(f"{adapter.config_path}: {err.args[0]}")
    params = core_adapters.from_file_keys(
        core_adapters.to_file_keys(adapter.params, adapter.kind), model_kind(model)
    )
    checked = core_adapters.check_shapes(params, shapes, adapter.spec.rank, source, adapter.names)
    if isinstance(checked, Failure):
        return checked
    missing = core_adapters.missing_targets(params, list(shapes))
    if missing:
        return Failure(f"{source}: no tensors for {missing[0]}.lora_a/.lora_b (and {len(missing) - 1} more layers) that adapter_config.json targets")
    return Success(_attached(model, adapter))


def _attached(model: nn.Module, adapter: Adapter) -> nn.Module:
    from finetune.files.weights import mlx_arrays

    attach(model, mlx_arrays(adapter.params), adapter.scale)
    mx.eval(model.parameters())
    return model
