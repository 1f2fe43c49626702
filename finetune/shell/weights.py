"""Reading HF safetensors checkpoints (single file or index + shards) into MLX arrays."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from returns.result import Failure, Success

from finetune.core.convert import merge_shards

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_safetensors_dir(path: str | Path) -> dict[str, mx.array]:
    """All tensors of `path/model.safetensors`, or of the shards its index names (HF's order of preference)."""
    path = Path(path)
    if (path / SINGLE).is_file():
        return dict(mx.load(str(path / SINGLE)))
    if not (path / INDEX).is_file():
        raise FileNotFoundError(f"{path} has neither {SINGLE} nor {INDEX}")
    weight_map: dict[str, str] = json.loads((path / INDEX).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    shards = [dict(mx.load(str(path / name))) for name in files]
    match merge_shards(shards):
        case Failure(message):
            raise ValueError(f"{path}: {message}")
        case Success(merged):
            pass
    if listed_missing := weight_map.keys() - merged.keys():
        raise ValueError(
            f"{path / INDEX} lists tensors no shard holds: {sorted(listed_missing)[:5]}"
        )
    return merged
