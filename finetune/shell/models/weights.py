"""Reading HF checkpoints into MLX arrays: safetensors (single or index + shards) first, else
`pytorch_model.bin` (single or sharded), read without executing pickled code."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from returns.result import Failure, Result, Success

from finetune.core.convert import merge_shards
from finetune.shell.models.torchbin import read_torch_bin

if TYPE_CHECKING:  # MLX is imported where it is used: these modules also serve the torch engine
    import mlx.core as mx

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# safetensors dtype tags -> MLX dtype names
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def checkpoint_files(directory: str | Path) -> Result[list[Path], str]:
    """The weight files a load would read, in HF's order of preference; missing shards fail."""
    directory = Path(directory)
    for single, index in ((SINGLE, INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (directory / single).is_file():
            return Success([directory / single])
        if (directory / index).is_file():
            return _index_files(directory / index).map(lambda names: [directory / n for n in names])
    return Failure(
        f"{directory}: no weights found (expected {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def _weight_map(index: Path) -> Result[dict[str, str], str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        return Failure(f"{index}: unreadable shard index ({type(err).__name__}: {err})")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for v in weight_map.values()
    ):
        return Failure(
            f"{index}: weight_map must map tensor names to file names in the same directory"
        )
    return Success(weight_map)


def _index_files(index: Path) -> Result[list[str], str]:
    def present(weight_map: dict[str, str]) -> Result[list[str], str]:
        names = sorted(set(weight_map.values()))
        if missing := [n for n in names if not (index.parent / n).is_file()]:
            return Failure(f"{index} names {missing[0]}, which is missing from {index.parent}")
        return Success(names)

    return _weight_map(index).bind(present)


def safetensors_header(path: str | Path) -> Result[dict, str]:
    """The JSON header of a safetensors file, after checking the file is long enough for it."""
    from finetune.shell.export import tensorfile

    return tensorfile.header(Path(path)).map(lambda found: found[0])


def read_safetensors(path: str | Path) -> Result[dict[str, mx.array], str]:
    """All tensors of one safetensors file (read lazily by MLX), its header checked first."""
    import mlx.core as mx  # here: header reads (models info, the torch engine) need no MLX

    def load(_header: dict) -> Result[dict[str, mx.array], str]:
        try:
            return Success(dict(mx.load(str(path), format="safetensors")))
        except Exception as err:  # MLX raises RuntimeError/ValueError for damaged files
            return Failure(f"{path}: cannot read safetensors ({err})")

    return safetensors_header(path).bind(load)


def _read_file(path: Path) -> Result[dict[str, mx.array], str]:
    return read_torch_bin(path) if path.suffix == ".bin" else read_safetensors(path)


def read_checkpoint(directory: str | Path) -> Result[dict[str, mx.array], str]:
    """Every tensor of a HF model directory, shards merged; a tensor the index lists must exist."""
    directory = Path(directory)

    def read_all(files: list[Path]) -> Result[dict[str, mx.array], str]:
        shards: list[dict[str, mx.array]] = []
        for f in files:
            match _read_file(f):
                case Success(tensors):
                    shards.append(tensors)
                case failure:
                    return failure
        return merge_shards(shards).alt(lambda m: f"{directory}: {m}").bind(check_index)

    def check_index(merged: dict[str, mx.array]) -> Result[dict[str, mx.array], str]:
        index = next((directory / i for i in (INDEX, BIN_INDEX) if (directory / i).is_file()), None)
        single = (directory / SINGLE).is_file() or (directory / BIN_SINGLE).is_file()
        if index is None or single:
            return Success(merged)
        listed = _weight_map(index).value_or({})
        if missing := sorted(listed.keys() - merged.keys()):
            return Failure(f"{index} lists tensors no shard holds: {', '.join(missing[:5])}")
        return Success(merged)

    return checkpoint_files(directory).bind(read_all)


def _header_entries(directory: str | Path) -> list[tuple[str, int]] | None:
    """(dtype tag, element count) of every safetensors tensor; None when the weights are .bin."""
    entries: list[tuple[str, int]] = []
    for f in checkpoint_files(directory).value_or([]):
        if f.suffix != ".safetensors":
            return None
        for k, v in safetensors_header(f).value_or({}).items():
            if k != "__metadata__":
                entries.append((v.get("dtype", ""), math.prod(v.get("shape", ()))))
    return entries


def checkpoint_dtype(directory: str | Path) -> str | None:
    """The floating dtype holding most weights, from the safetensors headers only."""
    counts: dict[str, int] = {}
    for tag, n in _header_entries(directory) or []:
        if tag in DTYPES:
            counts[DTYPES[tag]] = counts.get(DTYPES[tag], 0) + n
    return max(counts, key=counts.__getitem__) if counts else None


def parameter_count(directory: str | Path) -> int | None:
    """Number of stored weights from the safetensors headers (None for .bin checkpoints, and for
    quantized ones, whose uint32 words pack several weights each)."""
    entries = _header_entries(directory)
    if not entries or any(tag == "U32" for tag, _ in entries):
        return None
    return sum(n for _, n in entries)


def cast_weights(weights: Mapping[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating-point tensors cast to `dtype`; integer tensors (quantized data) kept as they are."""
    import mlx.core as mx

    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }
