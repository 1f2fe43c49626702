"""Adapter directories: write them (mlx-lm's format), read any (mlx-lm, FineTune run or
checkpoint, PEFT), attach them to a model, convert between mlx-lm and PEFT.

Files are read and written with NumPy (`tensorfile`): converting and inspecting need no MLX; only
`attach` (an MLX model) imports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import architectures, lora
from finetune.core import peft as core_peft
from finetune.core.dtypes import BF16
from finetune.files.paths import write_dir, write_safetensors, write_text
from finetune.shell.export import tensorfile

if TYPE_CHECKING:  # MLX only where an adapter meets an MLX model
    import mlx.core as mx
    import mlx.nn as nn

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_BIN = "adapter_model.bin"
FORMATS = {
    "mlx-lm": "mlx-lm",
    "run": "FineTune run directory",
    "checkpoint": "FineTune checkpoint",
    "peft": "PEFT",
}


def model_kind(model: nn.Module) -> str:
    """`gpt2` when the blocks live under `transformer.h`, else the Llama family's naming."""
    from finetune.engines.mlx import lora as lora_modules

    return architectures.family_of_blocks(lora_modules.layers_prefix(model)).family


def save(directory: Path, params: Mapping[str, mx.array], spec: core_adapters.AdapterSpec, model_kind_: str, extra: Mapping[str, Any] | None = None) -> None:
    """`adapters.safetensors` + `adapter_config.json`, each written atomically."""
    write_safetensors(directory / WEIGHTS, core_adapters.to_file_keys(params, model_kind_))
    write_text(directory / CONFIG, json.dumps(core_adapters.config_json(spec, extra), indent=2) + "\n")


def expected_shapes(model: nn.Module, spec: core_adapters.AdapterSpec) -> dict[str, tuple[int, int]]:
    """`{module path: (in, out)}` of the linears an adapter with `spec` targets in `model`."""
    from finetune.engines.mlx import lora as lora_modules

    block = lora_modules.block_linears(model)
    keys = lora.resolve_keys(spec.keys or ("all-linear",), block)
    unknown = [k for k in keys if k not in block]
    if unknown:
        raise KeyError(f"{', '.join(unknown)} not in this model's blocks (has: {', '.join(block)})")
    layers = lora.select_layers(len(model.layers), spec.num_layers)
    paths = lora.targets(lora_modules.layers_prefix(model), layers, keys)
    return lora_modules.linear_shapes(model, paths)


def attach(model: nn.Module, directory: str | Path) -> Result[nn.Module, str]:
    """Load an adapter directory of any format onto `model` (frozen base, LoRA layers swapped in)."""
    from finetune.engines.mlx import lora as lora_modules

    match load_any(directory):
        case Failure(message):
            return Failure(message)
        case Success(adapter):
            pass
    source = str(adapter.weights_path)
    if adapter.spec is None:  # PEFT: the tensors say which linears; check them against all of them
        block = lora_modules.block_linears(model)
        every = lora.targets(lora_modules.layers_prefix(model), range(len(model.layers)), block)
        shapes = lora_modules.linear_shapes(model, every)
        return core_adapters.check_shapes(adapter.params, shapes, adapter.rank, source, adapter.names).map(
            lambda _: _attached(model, adapter)
        )
    try:
        shapes = expected_shapes(model, adapter.spec)
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


def fit(adapter: Adapter, config: Mapping[str, Any]) -> Result[dict[str, np.ndarray], str]:
    """The adapter's tensors under `config`'s module names, if they fit its linear layers (from
    the config alone: no weights read, no engine)."""
    from finetune.core import modelinfo

    match modelinfo.facts(config):
        case Success(facts):
            pass
        case failure:
            return failure
    prefix = facts.architecture.blocks
    block = facts.linear_shapes()
    every = core_adapters.block_shapes(block, prefix, facts.num_layers)
    source = str(adapter.weights_path)
    params = core_adapters.from_file_keys(
        core_adapters.to_file_keys(adapter.params, adapter.kind), architectures.family_of_blocks(prefix).family
    )
    keys = lora.resolve_keys(adapter.spec.keys or ("all-linear",), tuple(block)) if adapter.spec else ()
    if unknown := [k for k in keys if k not in block]:
        return Failure(f"{adapter.config_path}: {', '.join(unknown)} not in this model's blocks (has: {', '.join(block)})")
    checked = core_adapters.check_shapes(params, every, adapter.rank, source, adapter.names)
    if isinstance(checked, Failure) or adapter.spec is None:
        return checked.map(lambda _: params)
    wanted = lora.targets(prefix, lora.select_layers(facts.num_layers, adapter.spec.num_layers), keys)
    missing = core_adapters.missing_targets(params, wanted)
    if missing:
        return Failure(f"{source}: no tensors for {missing[0]} (and {len(missing) - 1} more), which adapter_config.json targets")
    return Success(params)


def base_quantization(directory: str | Path) -> Result[dict[str, Any] | None, str]:
    """The quantized base an adapter records having been trained on (None: float or unrecorded)."""
    return load_any(directory).map(lambda a: a.spec.base_quantization if a.spec else None)


def _attached(model: nn.Module, adapter: Adapter) -> nn.Module:
    import mlx.core as mx

    from finetune.engines.mlx import lora as lora_modules

    lora_modules.attach(model, mlx_arrays(adapter.params), adapter.scale)
    mx.eval(model.parameters())
    return model


def mlx_arrays(tensors: Mapping[str, np.ndarray]) -> dict[str, mx.array]:
    """NumPy tensors as MLX arrays of the same dtype and bits (bfloat16 included)."""
    import mlx.core as mx

    return {k: mx.array(v.view(np.uint16)).view(mx.bfloat16) if v.dtype == BF16 else mx.array(v) for k, v in tensors.items()}


class Adapter(Struct, kw_only=True):
    """An adapter directory read into memory, whatever its format."""

    format: str  # a key of FORMATS
    directory: Path
    weights_path: Path
    config_path: Path
    rank: int
    scale: float
    dropout: float
    model: str  # the base model the adapter names
    params: dict[str, np.ndarray]  # our module paths: `<path>.lora_a` (in, r), `.lora_b` (r, out)
    names: dict[str, str]  # our tensor name -> the file's
    kind: str  # gpt2 or llama (the naming family)
    spec: core_adapters.AdapterSpec | None = None  # mlx-lm formats: the config as written
    peft: core_peft.PeftSpec | None = None  # PEFT: the config as written
    kept: dict[str, Any] = {}  # PEFT fields remembered by an import (`peft` in adapter_config.json)
    note: str = ""


def _read_json(path: Path) -> Result[Any, str]:
    try:
        return Success(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{path}: not valid JSON ({err})")


def _read_tensors(path: Path) -> Result[dict[str, np.ndarray], str]:
    if path.suffix == ".bin":
        from finetune.files.torchbin import read_torch_bin_numpy

        return read_torch_bin_numpy(path)
    return tensorfile.read(path)


def detect(directory: str | Path) -> Result[str, str]:
    """Which kind of adapter directory this is (a key of FORMATS), from its files."""
    d = Path(directory)
    if not d.is_dir():
        return Failure(f"{directory}: no such adapter directory")
    if (d / CONFIG).is_file() and ((d / PEFT_WEIGHTS).is_file() or (d / PEFT_BIN).is_file()):
        return Success("peft")
    if (d / WEIGHTS).is_file() and (d / "trainer.json").is_file() and not (d / CONFIG).is_file():
        return Success("checkpoint")
    if (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
        return Success("run" if (d / "recipe.toml").is_file() else "mlx-lm")
    if (d / CONFIG).is_file():
        return Failure(f"{d / WEIGHTS}: missing (an adapter directory holds {CONFIG} and {WEIGHTS}, or PEFT's {PEFT_WEIGHTS})")
    if (d / WEIGHTS).is_file():
        return Failure(f"{d / CONFIG}: missing (an adapter directory holds {CONFIG} and {WEIGHTS})")
    return Failure(f"{directory}: not an adapter directory (expected {CONFIG} with {WEIGHTS} (mlx-lm, FineTune) or {PEFT_WEIGHTS} (PEFT))")


def load_any(directory: str | Path) -> Result[Adapter, str]:
    """Read an adapter directory of any supported format; tensors renamed to our module paths."""
    return detect(directory).bind(lambda fmt: _load_peft(Path(directory)) if fmt == "peft" else _load_mlx(Path(directory), fmt))


def _load_mlx(d: Path, fmt: str) -> Result[Adapter, str]:
    config_path, note = d / CONFIG, ""
    if fmt == "checkpoint":  # checkpoints/step-NNNNNNN/ inside a run directory
        config_path = d.parent.parent / CONFIG
        note = f"step {d.name.removeprefix('step-').lstrip('0') or '0'} of run {d.parent.parent}"
        if not config_path.is_file():
            return Failure(f"{d}: a checkpoint without its run's {CONFIG} (looked for {config_path})")
    elif fmt == "run":
        note = f"{len(list((d / 'checkpoints').glob('step-*')))} checkpoints" if (d / "checkpoints").is_dir() else ""
    match _read_json(config_path).bind(lambda raw: core_adapters.parse_config(raw, str(config_path)).map(lambda s: (raw, s))):
        case Success((raw, spec)):
            pass
        case failure:
            return failure
    match _read_tensors(d / WEIGHTS):
        case Success(weights):
            pass
        case failure:
            return failure
    kind = core_adapters.file_kind(list(weights))
    params = core_adapters.from_file_keys(weights, kind)
    names = dict(zip(params, weights, strict=True))
    kept = raw.get("peft") if isinstance(raw.get("peft"), dict) else {}
    return Success(Adapter(
        format=fmt, directory=d, weights_path=d / WEIGHTS, config_path=config_path, rank=spec.rank,
        scale=spec.scale, dropout=spec.dropout, model=spec.model, params=params, names=names, kind=kind,
        spec=spec, kept=kept, note=note,
    ))


def _load_peft(d: Path) -> Result[Adapter, str]:
    config_path = d / CONFIG
    weights_path = d / PEFT_WEIGHTS if (d / PEFT_WEIGHTS).is_file() else d / PEFT_BIN
    match _read_json(config_path).bind(lambda raw: core_peft.parse_config(raw, str(config_path)).map(lambda s: (raw, s))):
        case Success((raw, spec)):
            pass
        case failure:
            return failure
    match _read_tensors(weights_path).bind(lambda t: core_peft.from_peft(t, str(weights_path))).bind(
        lambda p: core_peft.check_dora(p, spec, str(config_path)).map(lambda _: p)
    ):
        case Success(transposed):
            # PEFT stores the transposes: copy them into row-major arrays so the adapter loads with
            # the very bytes (and BLAS path, so bit-equal logits) of its mlx-lm import.
            params = {k: np.ascontiguousarray(v) for k, v in transposed.items()}
        case failure:
            return failure
    names = {n: core_peft.peft_name(n) for n in params}
    paths = core_adapters.paths_of(params)
    return Success(Adapter(
        format="peft", directory=d, weights_path=weights_path, config_path=config_path, rank=spec.rank,
        scale=spec.scale, dropout=spec.dropout, model=spec.base_model, params=params, names=names,
        kind=core_adapters.kind_of(paths), peft=spec, kept=core_peft.kept_fields(raw),
    ))


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

    def build(tmp: Path) -> None:
        tensorfile.write(tmp / weights, tensors, metadata)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    return write_dir(out, build, force)
