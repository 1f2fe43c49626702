"""`--backend auto|mlx|torch`: which engine trains, and a few words on why (for the backend line).

Only installed packages are looked up (`find_spec`), so choosing imports neither engine.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

from finetune.errors import UserError

BACKENDS = ("auto", "mlx", "torch")
INSTALL_TORCH = "pip install 'finetune[torch]'"
INSTALL_MLX = "pip install mlx (Apple silicon), 'mlx[cpu]' or 'mlx[cuda]' (Linux)"


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def torch_ready() -> bool:
    return installed("torch") and installed("peft")


def nvidia_gpu() -> bool:
    """An NVIDIA driver is loaded (without importing torch or MLX)."""
    return Path("/proc/driver/nvidia/version").exists()


def decide(requested: str | None = None) -> tuple[str, str]:
    """(engine, why) for `--backend` (None: `$FT_BACKEND`, else auto); missing engines refused."""
    requested = requested or os.environ.get("FT_BACKEND") or "auto"
    if requested not in BACKENDS:
        raise UserError(f"--backend {requested}: choose one of {', '.join(BACKENDS)}")
    mlx, torch = installed("mlx"), torch_ready()
    if requested == "mlx":
        if not mlx:
            raise UserError(f"--backend mlx: MLX is not installed here; {INSTALL_MLX}, or use --backend torch")
        return "mlx", "asked for"
    if requested == "torch":
        if not torch:
            raise UserError(f"--backend torch: torch and peft are not installed; {INSTALL_TORCH}")
        return "torch", "asked for"
    if not mlx and not torch:
        raise UserError(f"no training engine installed: {INSTALL_TORCH} (any OS), or {INSTALL_MLX}")
    if sys.platform == "darwin" and platform.machine() == "arm64" and mlx:
        return "mlx", "auto: Apple silicon"
    if not mlx:
        return "torch", "auto: MLX is not installed"
    if not torch:
        return "mlx", "auto: torch is not installed"
    if nvidia_gpu() and not _mlx_cuda():
        return "torch", "auto: NVIDIA GPU, and this MLX has no CUDA"
    return "mlx", "auto: MLX is the default where it runs; --backend torch may be faster on CPUs with native bf16"


def _mlx_cuda() -> bool:
    """mlx[cuda] installed (its CUDA build ships as the `mlx-cuda` distribution)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("mlx-cuda")
    except PackageNotFoundError:
        return False
    return True
