"""Training: recipes on disk, the run directory, the compiled loop, checkpoints, ranks, loss curves."""
