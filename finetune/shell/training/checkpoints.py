"""Checkpoints: adapters, optimizer state and trainer state, written as one renamed directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

from finetune.files.paths import build_dir, write_safetensors

FORMAT = 1
PREFIX = "step-"


def directory(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(
    run_dir: Path,
    step: int,
    adapters: Mapping[str, Any],
    optimizer: Mapping[str, Any],
    trainer: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoints/step-NNNNNNN/` in one rename, then drop all but the newest `keep`."""
    final = directory(run_dir) / f"{PREFIX}{step:07d}"

    def fill(tmp: Path) -> None:
        write_safetensors(tmp / "adapters.safetensors", adapters)
        write_safetensors(tmp / "optimizer.safetensors", optimizer)
        (tmp / "trainer.json").write_text(json.dumps({"format": FORMAT, **trainer}, indent=2) + "\n")

    if final.exists():  # the same step saved again (e.g. the last step is also a save step)
        shutil.rmtree(final)
    build_dir(final, fill)
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (half-written ones never have the final name)."""
    d = directory(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load(path: Path, read: Callable[[str], dict[str, Any]] | None = None) -> Result[tuple[dict[str, Any], dict[str, Any], dict[str, Any]], str]:
    """(trainer state, adapters, optimizer state) of one checkpoint; never executes code.

    `read` loads one safetensors file (default `mx.load`; the torch engine reads NumPy).
    """
    if read is None:
        import mlx.core as mx

        read = mx.load
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{path / 'trainer.json'}: unreadable checkpoint state ({err})")
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        return Failure(f"{path / 'trainer.json'}: not a FineTune checkpoint of format {FORMAT}")
    arrays = []
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        try:
            arrays.append(read(str(path / name)))
        except Exception as err:  # truncated or corrupt file
            return Failure(f"{path / name}: unreadable ({err}); delete this checkpoint to resume from an earlier one")
    return Success((trainer, arrays[0], arrays[1]))
