"""Where FineTune keeps things on disk, and atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def cache_root() -> Path:
    """`$FINETUNE_HOME`, else `$XDG_CACHE_HOME/finetune`, else `~/.cache/finetune`."""
    if os.environ.get("FINETUNE_HOME"):
        return Path(os.environ["FINETUNE_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finetune"


def write_text(path: str | Path, text: str) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_safetensors(path: str | Path, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Safetensors to a temporary name beside `path`, then rename.

    MLX arrays go through `mx.save_safetensors`; NumPy arrays (the torch engine's, which must not
    import MLX) through `safetensors.numpy`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        if all(type(v).__module__ == "numpy" for v in arrays.values()):
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata=dict(metadata or {"format": "mlx"}))
        else:
            import mlx.core as mx

            mx.save_safetensors(tmp, dict(arrays), metadata=dict(metadata or {"format": "mlx"}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _temporary_dir(final: Path) -> Path:
    """An empty directory beside `final`, with the permissions a plain mkdir would give."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    return tmp


def build_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary directory with `build`, then rename it to `final` in one step.

    Losing a race to another process building the same `final` is fine: theirs is kept.
    """
    tmp = _temporary_dir(final)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_dir(final: Path, build: Callable[[Path], None], force: bool = False) -> Path:
    """Like `build_dir` for user-named outputs: a non-empty `final` is refused unless `force`,
    and then swapped out and removed only after the new directory is in place.
    """
    from finetune.errors import UserError

    if final.exists() and not final.is_dir():
        raise UserError(f"{final}: exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not force:
        raise UserError(f"{final}: already exists and is not empty; pass --force to replace it")
    tmp = _temporary_dir(final)
    old = None
    try:
        build(tmp)
        if final.is_dir() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.rename(final, old / final.name)
        elif final.is_dir():
            final.rmdir()
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final
