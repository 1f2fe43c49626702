"""`--eval-generate N`: exact match on the first N valid rows at each validation of a run."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from finetune.errors import unwrap
from finetune.shell.data import datasets
from finetune.shell.evaluation import rows, run

BATCH = 8  # rows decoded together


def exact_match(prepared: Any, engine: str, log: Callable[[str], None]) -> Callable[[], float] | None:
    """A function measuring exact match of the model being trained (None when off or impossible).

    The rows, prompts and references are `ft eval`'s on the run's own recipe; bad rows stop the
    run before its first step, in one line.
    """
    recipe = prepared.recipe
    if not recipe.train.eval_generate:
        return None
    valid = unwrap(datasets.locate(recipe.data.path)).get("valid")
    if valid is None:
        log("warning: $.train.eval_generate: the data has no valid split; exact match is not recorded")
        return None
    cases = unwrap(rows.read(recipe, valid, prepared.tokenizer, recipe.train.eval_generate))
    if not cases.cases:
        log(f"warning: $.train.eval_generate: no row of {valid} has an answer; exact match is not recorded")
        return None
    model, greedy = _generator(prepared.model, engine)
    options = run.Options(batch_size=BATCH)

    def score() -> float:
        prepared.model.eval()  # no dropout while answering
        try:
            outcomes = list(run.answers(greedy, model, prepared.tokenizer, cases, options))
        finally:
            prepared.model.train()
        return sum(o.exact for o in outcomes) / len(outcomes)

    return score


def _generator(model: Any, engine: str) -> tuple[Any, Callable[..., list[list[int]]]]:
    """(what decodes, how): the MLX model itself, or the torch engine's transformers model under
    the training's autocast (a half-precision base keeps float32 LoRA factors)."""
    if engine == "torch":
        from finetune.engines.torch import evaluate as torch_engine

        return model.lm, partial(torch_engine.greedy, half=model.half_precision())
    from finetune.engines.mlx import evaluate as mlx_engine

    return model, mlx_engine.greedy
