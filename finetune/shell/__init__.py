"""Effects above the engines, written once for both: the train loop and run, evaluation, generation,
serving, export, data checks, recipes, plots."""
