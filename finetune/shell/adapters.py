"""Adapter directories in mlx-lm's format: write them, read them, attach them to a model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import lora
from finetune.models import lora as lora_modules
from finetune.shell.paths import write_text

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"


def model_kind(model: nn.Module) -> str:
    """`gpt2` when the blocks live under `transformer.h`, else the Llama family's naming."""
    return "gpt2" if lora_modules.layers_prefix(model).startswith("transformer.") else "llama"


def save(directory: Path, params: Mapping[str, mx.array], spec: core_adapters.AdapterSpec, model_kind_: str, extra: Mapping[str, Any] | None = None) -> None:
    """`adapters.safetensors` + `adapter_config.json`, each written atomically."""
    write_safetensors(directory / WEIGHTS, core_adapters.to_file_keys(params, model_kind_))
    write_text(directory / CONFIG, json.dumps(core_adapters.config_json(spec, extra), indent=2) + "\n")


def write_safetensors(path: Path, arrays: Mapping[str, mx.array], metadata: Mapping[str, str] | None = None) -> Path:
    """`mx.save_safetensors` to a temporary name beside `path`, then rename."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, dict(arrays), metadata=dict(metadata or {"format": "mlx"}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(directory: str | Path) -> Result[tuple[core_adapters.AdapterSpec, dict[str, mx.array]], str]:
    """The spec and the tensors (file names, not yet renamed for a model)."""
    d = Path(directory)
    if not d.is_dir():
        return Failure(f"{directory}: no such adapter directory")
    cfg_path, weights_path = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file():
        return Failure(f"{cfg_path}: missing (an adapter directory holds {CONFIG} and {WEIGHTS})")
    if not weights_path.is_file():
        return Failure(f"{weights_path}: missing (an adapter directory holds {CONFIG} and {WEIGHTS})")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{cfg_path}: not valid JSON ({err})")
    try:
        weights = mx.load(str(weights_path))
    except Exception as err:  # mlx raises RuntimeError/ValueError for truncated or foreign files
        return Failure(f"{weights_path}: unreadable safetensors ({err})")
    return core_adapters.parse_config(raw, str(cfg_path)).map(lambda spec: (spec, weights))


def expected_shapes(model: nn.Module, spec: core_adapters.AdapterSpec) -> dict[str, tuple[int, int]]:
    """`{module path: (in, out)}` of the linears an adapter with `spec` targets in `model`."""
    block = lora_modules.block_linears(model)
    keys = lora.resolve_keys(spec.keys or ("all-linear",), block)
    unknown = [k for k in keys if k not in block]
    if unknown:
        raise KeyError(f"{', '.join(unknown)} not in this model's blocks (has: {', '.join(block)})")
    layers = lora.select_layers(len(model.layers), spec.num_layers)
    paths = lora.targets(lora_modules.layers_prefix(model), layers, keys)
    return lora_modules.linear_shapes(model, paths)


def attach(model: nn.Module, directory: str | Path) -> Result[nn.Module, str]:
    """Load an adapter directory onto `model` (frozen base, LoRA layers swapped in)."""
    match read(directory):
        case Failure(message):
            return Failure(message)
        case Success((spec, weights)):
            pass
    source = str(Path(directory) / WEIGHTS)
    params = core_adapters.from_file_keys(weights, model_kind(model))
    try:
        shapes = expected_shapes(model, spec)
    except KeyError as err:
        return Failure(f"{Path(directory) / CONFIG}: {err.args[0]}")
    checked = core_adapters.check_shapes(params, shapes, spec.rank, source)
    if isinstance(checked, Failure):
        return checked
    missing = sorted(set(shapes) - {k.rpartition(".")[0] for k in params})
    if missing:
        return Failure(f"{source}: no tensors for {missing[0]}.lora_a/.lora_b (and {len(missing) - 1} more layers) that adapter_config.json targets")
    lora_modules.attach(model, params, spec.scale)
    mx.eval(model.parameters())
    return Success(model)
