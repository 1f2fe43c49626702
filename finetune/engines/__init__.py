"""Engines: how a recipe trains and a model generates. One package per engine with the same file
names for the same jobs (`mlx/`, `torch/`: load, lora, step, evaluate, generate, distributed,
budget, device, engine), each behind the one protocol (`protocol.py`), found here by name.

Above this package (the shell, the CLI, the API) an engine is reached through `get(name)` alone;
neither engine imports the other's framework, and choosing one (`choose.py`) imports neither.
"""

from __future__ import annotations

import importlib
from typing import Any

NAMES = ("mlx", "torch")


def get(name: str) -> Any:
    """The engine registered as `name` ("mlx" or "torch"): a `protocol.Engine`; imports only that
    engine. (This module imports nothing else: `import finetune` runs it, core code included.)"""
    if name not in NAMES:
        raise ValueError(f"no engine named {name!r}; the engines are {', '.join(NAMES)}")
    return importlib.import_module(f"finetune.engines.{name}.engine").ENGINE


def boot() -> None:
    """Before any engine loads: the MLX engine's BLAS must be in the global symbol scope before
    `mlx.core` is first imported (`mlx/blas.py`); nothing else is imported."""
    importlib.import_module("finetune.engines.mlx.blas").boot()
