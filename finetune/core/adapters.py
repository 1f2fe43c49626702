"""Adapter files in mlx-lm's format: key names, `adapter_config.json`, shape checks (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlx.core as mx
from msgspec import Struct
from returns.result import Failure, Result, Success

# Our GPT-2 keeps HF's `transformer.` prefix; mlx-lm's GPT-2 calls the same module `model.`.
_RENAMES = {"gpt2": ("transformer.h.", "model.h.")}


class AdapterSpec(Struct, frozen=True, kw_only=True):
    rank: int
    scale: float
    dropout: float = 0.0
    keys: tuple[str, ...]
    num_layers: int = -1
    model: str = ""
    fine_tune_type: str = "lora"


def to_file_keys(params: Mapping[str, mx.array], model_type: str) -> dict[str, mx.array]:
    """Our module paths -> the names mlx-lm gives the same tensors."""
    ours, theirs = _RENAMES.get(model_type, ("", ""))
    return {(theirs + k[len(ours):] if ours and k.startswith(ours) else k): v for k, v in params.items()}


def from_file_keys(params: Mapping[str, mx.array], model_type: str) -> dict[str, mx.array]:
    """mlx-lm's tensor names -> our module paths (inverse of `to_file_keys`)."""
    ours, theirs = _RENAMES.get(model_type, ("", ""))
    return {(ours + k[len(theirs):] if ours and k.startswith(theirs) else k): v for k, v in params.items()}


def config_json(spec: AdapterSpec, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`adapter_config.json` as mlx-lm writes and reads it (keys always explicit)."""
    return {
        "fine_tune_type": spec.fine_tune_type,
        "num_layers": spec.num_layers,
        "lora_parameters": {
            "rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout, "keys": list(spec.keys),
        },
        "model": spec.model,
        **(dict(extra) if extra else {}),
    }


def parse_config(raw: Any, source: str) -> Result[AdapterSpec, str]:
    """Read an mlx-lm `adapter_config.json` value; every problem names the field."""
    if not isinstance(raw, Mapping):
        return Failure(f"{source}: expected a JSON object")
    kind = raw.get("fine_tune_type", "lora")
    if kind != "lora":
        return Failure(f"{source}: fine_tune_type {kind!r} is not supported (only 'lora')")
    lp = raw.get("lora_parameters")
    if not isinstance(lp, Mapping):
        return Failure(f"{source}: missing 'lora_parameters'")
    rank, scale, keys = lp.get("rank"), lp.get("scale"), lp.get("keys")
    if not isinstance(rank, int) or rank < 1:
        return Failure(f"{source}: lora_parameters.rank must be an integer >= 1, got {rank!r}")
    if not isinstance(scale, int | float):
        return Failure(f"{source}: lora_parameters.scale must be a number, got {scale!r}")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return Failure(f"{source}: lora_parameters.keys must be a list of module paths")
    num_layers = raw.get("num_layers", -1)
    if not isinstance(num_layers, int):
        return Failure(f"{source}: num_layers must be an integer, got {num_layers!r}")
    return Success(AdapterSpec(
        rank=rank, scale=float(scale), dropout=float(lp.get("dropout", 0.0) or 0.0),
        keys=tuple(keys or ()), num_layers=num_layers, model=str(raw.get("model", "")),
    ))


def check_shapes(
    params: Mapping[str, mx.array], expected: Mapping[str, tuple[int, int]], rank: int, source: str
) -> Result[None, str]:
    """Every `<path>.lora_a` is (in, r) and `.lora_b` (r, out) for a linear the model has."""
    for name in sorted(params):
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            return Failure(f"{source}: {name} is not a LoRA tensor (expected names ending in .lora_a/.lora_b)")
        if path not in expected:
            return Failure(f"{source}: {name} names a layer this model does not have")
        fan_in, fan_out = expected[path]
        want = (fan_in, rank) if leaf == "lora_a" else (rank, fan_out)
        got = tuple(params[name].shape)
        if got != want:
            return Failure(f"{source}: {name} has shape {got}, the model needs {want}")
        twin = f"{path}.{'lora_b' if leaf == 'lora_a' else 'lora_a'}"
        if twin not in params:
            return Failure(f"{source}: {name} has no matching {twin}")
    return Success(None)
