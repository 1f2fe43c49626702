"""Engines: how a recipe trains. The MLX engine is `finetune.shell`/`finetune.engines.mlx.model`; the torch
engine (`finetune.engines.torch`: transformers models, peft LoRA) lives here. Both take what to
train (records, batches, schedules, LoRA initial values, the run-directory contract) from the
engine-free `finetune.core`, and neither imports the other's framework."""
