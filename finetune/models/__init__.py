"""MLX modules, one file per HuggingFace model_type, HF attribute names, no I/O."""
