"""The PyTorch engine: transformers' AutoModelForCausalLM with peft LoRA, trained on the core's batch
plan with the MLX engine's loss, optimizer and schedule, into the same run directory."""

import os

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a shared 2-core
# CPU spinning threads made a float32 matmul 6x slower (benchmarks/README.md); set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
