"""FineTune: LoRA fine-tuning of HuggingFace base models on MLX."""

# --- BLAS boot (keep first): an optimized BLAS must be in the global symbol scope before
# `mlx.core` is first imported, or MLX binds its bundled reference BLAS (~30x slower on the CPU).
from finetune.engines import boot as _boot

_boot()
# --- end of BLAS boot

__version__ = "0.1.0"


from finetune.errors import UserError  # noqa: E402  (bad input: the CLI's one-line message)

_API = {
    "load": "finetune.engines.mlx.load",
    "train": "finetune.api", "validate": "finetune.api", "evaluate": "finetune.api",
    "generate": "finetune.api", "recipe_of": "finetune.api", "Run": "finetune.api",
    "Recipe": "finetune.core.config", "ModelConfig": "finetune.core.config",
    "DataConfig": "finetune.core.config", "LoRAConfig": "finetune.core.config",
    "TrainingConfig": "finetune.core.config",
}
__all__ = ["UserError", *_API]


def __getattr__(name: str):
    """The API is imported on first use, so `import finetune` stays light (no MLX, no transformers)."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
