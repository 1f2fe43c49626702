"""The MLX engine: our own modules on MLX (one decoder for every architecture row), mlx-lm's adapter
format, one compiled function per step. `engine.py` implements the protocol."""
