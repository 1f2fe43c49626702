"""Adapter directories: write them (mlx-lm's format or PEFT's), convert between mlx-lm and PEFT.

Files are written with NumPy (`tensorfile`): converting and inspecting need no MLX. Reading any
format is `files/adapters.py` (below the engines, which read adapters too); attaching one to an
MLX model is the MLX engine's (`engines/mlx/lora.attach_adapter`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from returns.result import Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import peft as core_peft
from finetune.errors import unwrap
from finetune.files import tensorfile
from finetune.files.adapters import (  # noqa: F401  (reading lives below the engines; re-exported for the export code)
    CONFIG,
    FORMATS,
    PEFT_BIN,
    PEFT_WEIGHTS,
    WEIGHTS,
    Adapter,
    base_quantization,
    detect,
    fit,
    is_full,
    load_any,
)
from finetune.files.paths import write_dir, write_safetensors, write_text
from finetune.files.weights import mlx_arrays  # noqa: F401  (re-exported for fuse_base)
from finetune.shell.export import outputs

if TYPE_CHECKING:  # MLX only where an adapter meets an MLX model
    import mlx.core as mx


def save(directory: Path, params: Mapping[str, mx.array], spec: core_adapters.AdapterSpec, model_kind_: str, extra: Mapping[str, Any] | None = None) -> None:
    """`adapters.safetensors` + `adapter_config.json`, each written atomically."""
    write_safetensors(directory / WEIGHTS, core_adapters.to_file_keys(params, model_kind_))
    write_text(directory / CONFIG, json.dumps(core_adapters.config_json(spec, extra), indent=2) + "\n")


def mlx_files(adapter: Adapter, total_layers: int | None) -> Result[tuple[dict[str, np.ndarray], dict[str, Any]], str]:
    """`adapters.safetensors` tensors and `adapter_config.json` (mlx-lm's format) for `adapter`."""
    if adapter.spec is not None:
        spec = adapter.spec
        extra = {"peft": adapter.kept} if adapter.kept else None
    else:
        assert adapter.peft is not None
        paths = core_adapters.paths_of(adapter.params)
        layers, _ = core_adapters.layers_and_keys(paths)
        match core_peft.num_layers(layers, adapter.peft, total_layers, str(adapter.config_path)):
            case Success(n):
                spec = core_peft.to_spec(adapter.peft, paths, n)
            case failure:
                return failure
        extra = {"peft": adapter.kept}
    tensors = core_adapters.to_file_keys(adapter.params, adapter.kind)
    return Success((tensors, core_adapters.config_json(spec, extra)))


def peft_files(adapter: Adapter, base_model: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`adapter_model.safetensors` tensors and PEFT's `adapter_config.json` for `adapter`."""
    paths = core_adapters.paths_of(adapter.params)
    if adapter.spec is not None:
        spec = adapter.spec
    else:
        assert adapter.peft is not None
        layers, _ = core_adapters.layers_and_keys(paths)
        every = adapter.peft.layers_to_transform is None
        spec = core_peft.to_spec(adapter.peft, paths, -1 if every else len(layers))
    config = core_peft.config_json(spec, paths, base_model or adapter.model, adapter.kept)
    return core_peft.to_peft(adapter.params), config


def write_adapter(out: Path, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], fmt: str, force: bool = False) -> Path:
    """An adapter directory in `fmt` (`peft` or `mlx-lm`), written as one rename."""
    weights, metadata = (PEFT_WEIGHTS, {"format": "pt"}) if fmt == "peft" else (WEIGHTS, {"format": "mlx"})
    unwrap(outputs.check_folder(out))  # a missing folder is made when writing

    def build(tmp: Path) -> None:
        tensorfile.write(tmp / weights, tensors, metadata)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    return write_dir(out, build, force)
