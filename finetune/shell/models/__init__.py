"""Model loading and inference: MODEL names to directories, checkpoints, the converted cache, tiny, tokenizers, generation."""
