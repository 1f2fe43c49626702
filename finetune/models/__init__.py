"""MLX modules, one file per HuggingFace model_type, HF attribute names, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import mlx.nn as nn

from finetune.models import gpt2, llama

# model_type -> (HF config mapping -> args, Model class taking those args)
ARCHITECTURES: dict[str, tuple[Callable[[Mapping], Any], type[nn.Module]]] = {
    "llama": (llama.args_from_config, llama.Model),
    "mistral": (llama.args_from_config, llama.Model),
    "qwen2": (llama.args_from_config, llama.Model),
    "gpt2": (gpt2.args_from_config, gpt2.Model),
}


def build(config: Mapping) -> nn.Module:
    """A randomly initialised model for a HF config.json mapping (load weights afterwards)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    args_from_config, model_class = ARCHITECTURES[model_type]
    return model_class(args_from_config(config))
