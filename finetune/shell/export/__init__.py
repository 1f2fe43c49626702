"""Results elsewhere: adapter directories in every format, and fused HF model directories."""
