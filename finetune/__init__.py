"""FineTune: LoRA fine-tuning of HuggingFace base models on MLX."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`finetune.load` is imported on first use, so `import finetune` stays light."""
    if name == "load":
        from finetune.shell.load import load

        return load
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
