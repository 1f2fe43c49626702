"""Safetensors files as NumPy arrays, with neither MLX nor torch (bfloat16 as `dtypes.BF16`)."""

from __future__ import annotations

import json
import mmap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from returns.result import Failure, Result, Success

from finetune.core.dtypes import BF16

# safetensors dtype tags <-> NumPy dtypes (little-endian, as the format stores them)
TAGS: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BF16,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def header(path: Path) -> Result[tuple[dict, int], str]:
    """The JSON header of a safetensors file and where its data starts, checked against its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw = f.read(n) if 8 + n <= size and n <= _MAX_HEADER else b""
    except OSError as err:
        return Failure(f"{path}: cannot read ({err.strerror or err})")
    if size < 8 or 8 + n > size or n > _MAX_HEADER:
        return Failure(f"{path}: not a safetensors file, or truncated ({size} bytes)")
    try:
        found = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in found.items() if k != "__metadata__"]
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        return Failure(f"{path}: corrupt safetensors header")
    if 8 + n + max(ends, default=0) > size:
        return Failure(f"{path}: truncated ({size} bytes, the header needs {8 + n + max(ends)})")
    return Success((found, 8 + n))


def read(path: str | Path) -> Result[dict[str, np.ndarray], str]:
    """Every tensor of one safetensors file (memory-mapped, read-only), in the file's order."""
    path = Path(path)
    match header(path):
        case Success((found, start)):
            pass
        case failure:
            return failure
    out: dict[str, np.ndarray] = {}
    with path.open("rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    for name, entry in found.items():
        if name == "__metadata__":
            continue
        tag, shape, (begin, end) = entry.get("dtype"), tuple(entry.get("shape", ())), entry["data_offsets"]
        if tag not in TAGS:
            return Failure(f"{path}: tensor {name} has dtype {tag}, which FineTune does not read")
        dtype = TAGS[tag]
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            return Failure(f"{path}: corrupt safetensors header ({name}: {shape} {tag} in {end - begin} bytes)")
        out[name] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                  offset=start + begin).reshape(shape)
    return Success(out)


def write(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file (not atomic by itself: write into `paths.write_dir`'s temporary directory)."""
    tags = {v: k for k, v in TAGS.items()}
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors):  # the safetensors library's own order
        a = np.ascontiguousarray(tensors[name])
        a = a if a.dtype.byteorder != ">" else a.astype(a.dtype.newbyteorder("<"))
        entries[name] = {"dtype": tags[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    head = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
