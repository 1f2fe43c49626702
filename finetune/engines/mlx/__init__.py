"""Where MLX computes: the device and the BLAS behind CPU matmuls."""
