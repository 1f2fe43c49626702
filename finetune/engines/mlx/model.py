"""MLX modules: one decoder for every registry row (`decoder.py`), HF attribute names, no I/O."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import mlx.nn as nn

from finetune.core import architectures


def build(config: Mapping) -> nn.Module:
    """A randomly initialised model for a HF config.json mapping (load weights afterwards).

    The module file comes from the architecture registry (`core/architectures.py`); every row
    names `decoder`, which reads the row.
    """
    model_type = config.get("model_type")
    if model_type not in architectures.REGISTRY:
        raise ValueError(architectures.unsupported(model_type))
    module = importlib.import_module(f"finetune.engines.mlx.{architectures.REGISTRY[model_type].module}")
    return module.Model(module.args_from_config(config))
