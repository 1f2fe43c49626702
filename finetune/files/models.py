"""MODEL specs to local directories with checked config.json files, and the dtype a checkpoint
stores: engine-free (no weights read, no engine imported)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from returns.result import Failure, Result

from finetune.core import quantization
from finetune.core.convert import SUPPORTED
from finetune.files import sources, weights


def check_config(config: Mapping[str, Any], where: str, any_architecture: bool = False) -> Result[Mapping[str, Any], str]:
    """Refuse custom-code models and (unless `any_architecture`) architectures we have no module for."""
    if "auto_map" in config:
        return Failure(
            f"{where}: config.json has auto_map (custom model code); FineTune never runs "
            "remote code (trust_remote_code is not supported)"
        )
    kind = config.get("model_type")
    if kind not in SUPPORTED and not any_architecture:
        return Failure(
            f"{where}: unsupported architecture {kind!r}; supported: {', '.join(SUPPORTED)}"
        )
    return quantization.from_config(config, f"{where}: config.json").map(lambda _: config)


def model_config(spec: str, revision: str = "main", any_architecture: bool = False) -> Result[tuple[Path, Mapping[str, Any]], str]:
    """MODEL's local directory and its checked config.json (no weights read)."""
    return sources.model_dir(spec, revision).bind(
        lambda directory: sources.read_config(directory).bind(
            lambda c: check_config(c, spec, any_architecture)).map(lambda c: (directory, c))
    )


def checkpoint_dtype(directory: Path, config: Mapping[str, Any]) -> str | None:
    return weights.checkpoint_dtype(directory) or config.get("torch_dtype") or config.get("dtype")


def resolve_dtype(dtype: str, checkpoint: str | None, gpu: bool) -> str:
    """`auto`: float32 on CPU (MLX's CPU half precision is slow), the checkpoint's dtype on GPU."""
    if dtype != "auto":
        return dtype
    if not gpu or checkpoint not in ("float16", "bfloat16"):
        return "float32"
    return checkpoint
