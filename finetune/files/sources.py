"""MODEL names -> local HuggingFace-layout directories.

Order: an existing local directory; `tiny`; the local HF cache (works with HF_HUB_OFFLINE=1);
otherwise, when online, a download of config, tokenizer and weight files only.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

# What a download fetches besides the weights: configs, tokenizer files, chat templates.
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template.*",
]
SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
BIN = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub computes it, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.environ[var]))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_hub_id(spec: str) -> bool:
    """`org/name` (no leading `.`, `/` or `~`): what the hub accepts as a model repo id."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def model_dir(spec: str, revision: str = "main") -> Result[Path, str]:
    """A local directory with config.json for a MODEL spec (may build `tiny` or download)."""
    path = Path(os.path.expanduser(spec))
    gguf_file = _gguf_file(path)
    if gguf_file is not None:
        from finetune.files.gguf import converted_dir

        return converted_dir(gguf_file)
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Failure(f"{spec}: not a model directory (no config.json)")
        return Success(path)
    if spec == "tiny":
        from finetune.files.tiny import ensure_tiny

        return Success(ensure_tiny())
    if path.exists():
        return Failure(f"{spec}: not a model directory (a file, not a directory)")
    if not is_hub_id(spec):
        return Failure(
            f"{spec}: no such model directory (expected a local path, a hub id like org/name, "
            "or 'tiny')"
        )
    cached = cached_snapshot(spec, revision)
    if cached is not None:
        return Success(cached)
    if offline():
        return Failure(
            f"{spec}: not in the local HuggingFace cache ({hub_cache_dir()}) and HF_HUB_OFFLINE "
            f"is set; download it once while online (hf download {spec})"
        )
    return download(spec, revision)


def _gguf_file(path: Path) -> Path | None:
    """A llama.cpp `.gguf` file, or the only one in a directory without config.json."""
    from finetune.files.gguf import is_gguf, single_gguf

    if path.is_dir():
        return single_gguf(path)
    return path if is_gguf(path) else None


def cached_snapshot(repo: str, revision: str = "main") -> Path | None:
    """The cached snapshot directory of `repo` at `revision`, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True
            )
        )
    except Exception:  # huggingface_hub raises several types for "not cached" and bad ids
        return None


def download(repo: str, revision: str = "main") -> Result[Path, str]:
    """Config, tokenizer and weights of `repo` (safetensors; .bin only when there is none)."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo, revision=revision)
        has_safetensors = any(fnmatch(f, p) for f in files for p in SAFETENSORS)
        patterns = SIDE_FILES + (SAFETENSORS if has_safetensors else BIN)
        where = snapshot_download(
            repo, revision=revision, cache_dir=hub_cache_dir(), allow_patterns=patterns
        )
    except Exception as err:  # not found, gated, no network: one line with the hub's reason
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return Failure(
            f"{repo}: cannot download from the HuggingFace hub ({type(err).__name__}: {reason})"
        )
    return Success(Path(where))


def read_config(directory: Path) -> Result[dict[str, Any], str]:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return Failure(f"{path}: unreadable config ({err})")
    if not isinstance(config, dict):
        return Failure(f"{path}: expected a JSON object")
    return Success(config)
