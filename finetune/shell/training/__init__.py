"""Training above the engines: the one loop, the run (prepare, fit, resume), the run directory,
checkpoints, the ranks' agreement."""
