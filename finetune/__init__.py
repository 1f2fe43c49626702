"""FineTune: LoRA fine-tuning of HuggingFace base models on MLX."""

# --- BLAS boot (keep first): an optimized BLAS must be in the global symbol scope before
# `mlx.core` is first imported, or MLX binds its bundled reference BLAS (~30x slower on the CPU).
from finetune.shell.blas import boot as _boot_blas

_boot_blas()
# --- end of BLAS boot

__version__ = "0.1.0"


def __getattr__(name: str):
    """`finetune.load` is imported on first use, so `import finetune` stays light."""
    if name == "load":
        from finetune.shell.load import load

        return load
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
