"""FineTune: LoRA fine-tuning of HuggingFace base models on MLX."""

__version__ = "0.1.0"
