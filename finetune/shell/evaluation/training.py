"""`--eval-generate N`: exact match on the first N valid rows at each validation of a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune import engines
from finetune.errors import unwrap
from finetune.files import datasets
from finetune.shell.evaluation import rows, run

BATCH = 8  # rows decoded together


def exact_match(prepared: Any, log: Callable[[str], None]) -> Callable[[], float] | None:
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
    engine = engines.get(prepared.engine)
    model, precision = engine.sampler(prepared)  # what decodes, in the precision it trains in
    options = run.Options(batch_size=BATCH)

    def score() -> float:
        prepared.model.eval()  # no dropout while answering
        try:
            with precision():
                outcomes = list(run.answers(engine.greedy, model, prepared.tokenizer, cases, options))
        finally:
            prepared.model.train()
        return sum(o.exact for o in outcomes) / len(outcomes)

    return score
