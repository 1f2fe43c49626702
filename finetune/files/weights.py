"""The one checked reader of HF checkpoints, for both engines: safetensors (single or index +
shards) first, else `pytorch_model.bin` (single or sharded) read without executing pickled code;
MLX arrays for the MLX engine, NumPy arrays for the torch engine and `ft fuse`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from returns.result import Failure, Result, Success

from finetune.core.dtypes import BF16
from finetune.files.torchbin import read_torch_bin, read_torch_bin_numpy

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
    from finetune.files import tensorfile

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


def _read_file_numpy(path: Path) -> Result[dict[str, np.ndarray], str]:
    from finetune.files import tensorfile

    return read_torch_bin_numpy(path) if path.suffix == ".bin" else tensorfile.read(path)


def read_checkpoint(directory: str | Path) -> Result[dict[str, mx.array], str]:
    """Every tensor of a HF model directory as MLX arrays, checked by `read_located`."""
    return read_located(directory, _read_file).map(lambda found: found[0])


def read_checkpoint_numpy(directory: str | Path) -> Result[tuple[dict[str, np.ndarray], dict[str, Path]], str]:
    """Every tensor as NumPy (bfloat16 as `core.dtypes.BF16`), and the file holding each one."""
    return read_located(directory, _read_file_numpy)


def read_located(directory: str | Path, read_file: Callable[[Path], Result[dict, str]]) -> Result[tuple[dict, dict[str, Path]], str]:
    """`({name: tensor}, {name: file})` of a HF model directory, every file checked: safetensors
    headers cover their files and hold dtypes FineTune reads, .bin pickles run no code, and an
    index and its shards agree both ways (each tensor in the shard the index names)."""
    directory = Path(directory)

    def read_all(files: list[Path]) -> Result[tuple[dict, dict[str, Path]], str]:
        tensors: dict = {}
        where: dict[str, Path] = {}
        for f in files:
            match _known_dtypes(f).bind(lambda _, f=f: read_file(f)):
                case Success(found):
                    pass
                case failure:
                    return failure
            if twice := next((k for k in found if k in where), None):
                return Failure(f"{f}: tensor {twice} is also in {where[twice].name}; a tensor belongs to one shard")
            tensors.update(found)
            where.update(dict.fromkeys(found, f))
        return _check_index(directory, where).map(lambda _: (tensors, where))

    return checkpoint_files(directory).bind(read_all)


def _known_dtypes(path: Path) -> Result[None, str]:
    """A safetensors tensor in a dtype neither engine reads (FP8, complex, ...) is named here."""
    from finetune.files.tensorfile import TAGS

    if path.suffix == ".bin":
        return Success(None)
    return safetensors_header(path).bind(lambda header: next(
        (Failure(f"{path}: tensor {k} is stored as {v.get('dtype')}, which FineTune does not read "
                 f"(it reads {', '.join(TAGS)})")
         for k, v in header.items() if k != "__metadata__" and v.get("dtype") not in TAGS),
        Success(None)))


def _check_index(directory: Path, where: Mapping[str, Path]) -> Result[None, str]:
    """The index (when the weights are sharded) names exactly the tensors the shards hold."""
    index = next((directory / i for i in (INDEX, BIN_INDEX) if (directory / i).is_file()), None)
    single = (directory / SINGLE).is_file() or (directory / BIN_SINGLE).is_file()
    if index is None or single:
        return Success(None)
    listed = _weight_map(index).value_or({})
    if missing := sorted(listed.keys() - where.keys()):
        return Failure(f"{index} lists tensors no shard holds: {', '.join(missing[:5])}")
    if extra := sorted(where.keys() - listed.keys()):
        return Failure(f"{where[extra[0]]}: holds tensor {extra[0]}, which {index.name} does not list")
    if moved := next((k for k in sorted(listed) if listed[k] != where[k].name), None):
        return Failure(f"{index} puts {moved} in {listed[moved]}, but {where[moved].name} holds it")
    return Success(None)


def source(directory: str | Path) -> Path:
    """What a message about the whole checkpoint names: its single file, or its index."""
    directory = Path(directory)
    names = (SINGLE, INDEX, BIN_SINGLE, BIN_INDEX)
    return next((directory / n for n in names if (directory / n).is_file()), directory)


def file_of(directory: str | Path, name: str) -> Path:
    """The weight file that holds tensor `name` (the directory when no file lists it)."""
    directory = Path(directory)
    for single, index in ((SINGLE, INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (directory / single).is_file():
            return directory / single
        if (directory / index).is_file():
            listed = _weight_map(directory / index).value_or({})
            found = listed.get(name) or listed.get(name.split(".", 1)[-1])  # GPT-2's bare names
            return directory / found if found else directory / index
    return directory


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


def mlx_arrays(tensors: Mapping[str, np.ndarray]) -> dict[str, mx.array]:
    """NumPy tensors as MLX arrays of the same dtype and bits (bfloat16 included)."""
    import mlx.core as mx

    return {k: mx.array(v.view(np.uint16)).view(mx.bfloat16) if v.dtype == BF16 else mx.array(v) for k, v in tensors.items()}
