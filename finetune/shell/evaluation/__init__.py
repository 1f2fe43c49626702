"""`ft eval`, `finetune.evaluate` and `--eval-generate`: task quality on held-out rows.

`rows` reads a split into prompt/reference cases (the core's split), `mlx_engine` and
`torch_engine` decode greedily in batches and score the loss, `run` drives models and adapters
side by side, `table` prints the result, `training` scores exact match during a run.
"""
