"""Adapter directories read into memory, any format (mlx-lm, FineTune run or checkpoint, PEFT),
tensors renamed to our module paths: engine-free (NumPy; `tensorfile`), below both engines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import adapters as core_adapters
from finetune.core import architectures, lora
from finetune.core import peft as core_peft
from finetune.files import tensorfile

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


def load_any(directory: str | Path, full: bool = False) -> Result[Adapter, str]:
    """Read an adapter directory of any supported format; tensors renamed to our module paths.

    `full`: also a full fine-tune's run (`params` then hold the trained blocks' weights, our names);
    elsewhere one is refused in one line (`core.adapters.FULL_REFUSED`).
    """
    return detect(directory).bind(
        lambda fmt: _load_peft(Path(directory)) if fmt == "peft" else _load_mlx(Path(directory), fmt, full))


def is_full(directory: str | Path) -> bool:
    """The directory is a full fine-tune's (its adapter_config.json says `fine_tune_type: "full"`)."""
    d = Path(directory)
    config = d / CONFIG if (d / CONFIG).is_file() else d.parent.parent / CONFIG  # a checkpoint: its run's
    raw = _read_json(config).value_or(None) if config.is_file() else None
    return isinstance(raw, dict) and raw.get("fine_tune_type") == "full"


def _load_mlx(d: Path, fmt: str, full: bool = False) -> Result[Adapter, str]:
    config_path, note = d / CONFIG, ""
    if fmt == "checkpoint":  # checkpoints/step-NNNNNNN/ inside a run directory
        config_path = d.parent.parent / CONFIG
        note = f"step {d.name.removeprefix('step-').lstrip('0') or '0'} of run {d.parent.parent}"
        if not config_path.is_file():
            return Failure(f"{d}: a checkpoint without its run's {CONFIG} (looked for {config_path})")
    elif fmt == "run":
        note = f"{len(list((d / 'checkpoints').glob('step-*')))} checkpoints" if (d / "checkpoints").is_dir() else ""
    match _read_json(config_path).bind(lambda raw: core_adapters.parse_config(raw, str(config_path), full).map(lambda s: (raw, s))):
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


def base_quantization(directory: str | Path) -> Result[dict[str, Any] | None, str]:
    """The quantized base an adapter records having been trained on (None: float or unrecorded)."""
    return load_any(directory, full=True).map(lambda a: a.spec.base_quantization if a.spec else None)


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
