"""The PyTorch engine: transformers' AutoModelForCausalLM with peft LoRA, trained on the core's
batch plan with the MLX engine's loss, optimizer and schedule, into the same run directory."""
