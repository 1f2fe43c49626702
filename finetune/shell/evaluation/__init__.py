"""`ft eval`, `finetune.evaluate` and `--eval-generate`: task quality on held-out rows.

`rows` reads a split into prompt/reference cases (the core's split), each engine decodes greedily
in batches and scores the loss (`Engine.greedy`, `Engine.loss`), `run` drives models and adapters
side by side, `table` prints the result, `training` scores exact match during a run.
"""
