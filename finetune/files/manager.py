"""The converted-model cache: MLX weights saved once per (source directory, dtype).

Only conversions that cost something are kept: a pickled `.bin` checkpoint, or one whose floats
need a cast (bfloat16 -> float32 on CPU, say). A safetensors checkpoint already in the wanted
dtype loads as fast from its own files as from a copy, so it gets no entry.

`cache_root()/converted/<name>-<dtype>-<hash>/` holds `model.safetensors` (our modules' names,
already cast) and `manifest.json` (source, revision, dtype, model_type, parameters, and the size
and mtime of every source file, so a changed checkpoint is converted again). Files are written to
temporary names and renamed, the manifest last: a manifest means its weights are complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from returns.result import Result, Success

from finetune.core.convert import hf_to_mlx
from finetune.files import weights
from finetune.files.paths import cache_root, write_bytes, write_safetensors
from finetune.files.weights import cast_weights

if TYPE_CHECKING:  # MLX is imported where it is used: these modules also serve the torch engine
    import mlx.core as mx

FORMAT = 1  # bump when conversion changes what the cached files hold
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    source: str  # the MODEL spec as given (hub id, `tiny`) or the local directory
    revision: str
    directory: str  # the resolved source directory
    dtype: str
    model_type: str
    parameters: int
    files: dict[str, tuple[int, int]]  # source file -> (size, mtime_ns)


def converted_root() -> Path:
    return cache_root() / "converted"


def entry_dir(spec: str, directory: Path, dtype: str) -> Path:
    """One entry per resolved source directory and dtype (a hub snapshot's path names its commit)."""
    digest = hashlib.sha256(f"{directory.resolve()}\0{dtype}".encode()).hexdigest()[:12]
    label = directory.resolve().name if _is_local(spec) else spec.replace("/", "--")
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return converted_root() / f"{label}-{dtype}-{digest}"


def _is_local(spec: str) -> bool:
    return Path(os.path.expanduser(spec)).is_dir()


SOURCE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
SOURCE_PATTERNS += ("pytorch_model.bin.index.json",)


def source_files(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of config.json and every weight or index file (symlinks followed)."""
    names = sorted({f.name for p in SOURCE_PATTERNS for f in directory.glob(p) if f.is_file()})
    out = {}
    for name in names:
        st = (directory / name).stat()
        out[name] = (st.st_size, st.st_mtime_ns)
    return out


def convert(directory: Path, config: Mapping[str, Any], dtype: str) -> Result[dict, str]:
    """Read the checkpoint, map it onto our modules' names and shapes, cast floats to `dtype`."""
    return _convert(directory, config, dtype).map(lambda pair: pair[0])


def _convert(
    directory: Path, config: Mapping[str, Any], dtype: str
) -> Result[tuple[dict[str, mx.array], bool], str]:
    """Converted weights, and whether saving them pays: the source is .bin or needs a cast."""
    import mlx.core as mx  # lazily: `ft models list/info` read manifests without MLX
    kind, target = config.get("model_type", ""), getattr(mx, dtype)

    def to_mlx(tensors: dict[str, mx.array]) -> Result[tuple[dict, bool], str]:
        pickled = any(f.suffix == ".bin" for f in weights.checkpoint_files(directory).value_or([]))
        cast = any(
            mx.issubdtype(v.dtype, mx.floating) and v.dtype != target for v in tensors.values()
        )
        return (
            hf_to_mlx(kind, config, tensors)
            .alt(lambda m: f"{directory}: {m}")
            .map(lambda w: (cast_weights(w, target), pickled or cast))
        )

    return weights.read_checkpoint(directory).bind(to_mlx)


def read_manifest(entry: Path) -> Manifest | None:
    try:
        return msgspec.json.decode((entry / MANIFEST).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return None


def _cached(entry: Path, directory: Path) -> dict[str, mx.array] | None:
    """The entry's weights when its manifest matches the source files as they are now."""
    manifest = read_manifest(entry)
    if manifest is None or manifest.format != FORMAT:
        return None
    try:
        if manifest.files != source_files(directory):
            return None
    except OSError:
        return None
    return weights.read_safetensors(entry / WEIGHTS).value_or(None)


def _save(entry: Path, tensors: Mapping[str, mx.array], manifest: Manifest) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    (entry / MANIFEST).unlink(missing_ok=True)  # stale until the new weights are in place
    write_safetensors(entry / WEIGHTS, tensors, {"format": "mlx"})
    write_bytes(entry / MANIFEST, msgspec.json.format(msgspec.json.encode(manifest)))


def converted(
    spec: str, revision: str, directory: Path, config: Mapping[str, Any], dtype: str
) -> Result[dict[str, mx.array], str]:
    """Converted weights from the cache, or converted now and saved there for next time."""
    entry = entry_dir(spec, directory, dtype)
    hit = _cached(entry, directory)
    if hit is not None:
        return Success(hit)
    match _convert(directory, config, dtype):
        case Success((tensors, worth_saving)):
            pass
        case failure:
            return failure
    if not worth_saving:  # safetensors already in `dtype`: a copy would load no faster
        shutil.rmtree(entry, ignore_errors=True)  # an entry left from an older source
        return Success(tensors)
    manifest = Manifest(
        format=FORMAT,
        source=str(directory.resolve()) if _is_local(spec) else spec,
        revision=revision,
        directory=str(directory.resolve()),
        dtype=dtype,
        model_type=str(config.get("model_type")),
        parameters=sum(v.size for v in tensors.values()),
        files=source_files(directory),
    )
    with contextlib.suppress(OSError, RuntimeError):  # a read-only or full cache: slower next time
        _save(entry, tensors, manifest)
    return Success(tensors)


def entries() -> list[tuple[Path, Manifest]]:
    """Every complete cache entry with its manifest, sorted by source then dtype."""
    root = converted_root()
    found = [(d, read_manifest(d)) for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    return sorted(
        ((d, m) for d, m in found if m is not None and (d / WEIGHTS).is_file()),
        key=lambda e: (e[1].source, e[1].dtype),
    )


def is_fresh(manifest: Manifest) -> bool:
    """Whether the entry still matches its source files."""
    try:
        return manifest.format == FORMAT and manifest.files == source_files(
            Path(manifest.directory)
        )
    except OSError:
        return False
