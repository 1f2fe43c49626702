"""MODEL names -> local HuggingFace-layout directories (local dir, HF cache, or `tiny`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success


def model_dir(spec: str, revision: str = "main") -> Result[Path, str]:
    """A local directory with config.json; hub ids come from the local HF cache only here."""
    if spec == "tiny":
        from finetune.shell.tiny import ensure_tiny

        return Success(ensure_tiny())
    path = Path(os.path.expanduser(spec))
    if path.exists():
        if not (path / "config.json").is_file():
            return Failure(f"{spec}: not a model directory (no config.json)")
        return Success(path)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        return Failure(f"{spec}: no such model directory (expected a local path, a hub id like org/name, or 'tiny')")
    from huggingface_hub import snapshot_download

    try:
        return Success(Path(snapshot_download(spec, revision=revision, local_files_only=True)))
    except Exception:  # huggingface_hub raises several types for "not cached"
        return Failure(f"{spec}: not in the local HuggingFace cache; download it once while online (huggingface-cli download {spec})")


def read_config(directory: Path) -> Result[dict[str, Any], str]:
    path = directory / "config.json"
    try:
        return Success(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{path}: unreadable config ({err})")
