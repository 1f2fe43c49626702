"""`ft eval`: task quality of a model and its adapters on held-out rows."""

from __future__ import annotations

import sys
from typing import Annotated, Literal

from cyclopts import Parameter


def eval_(
    model: str,
    data: str,
    /,
    *,
    adapter: Annotated[tuple[str, ...], Parameter(consume_multiple=True, negative=())] = (),
    split: str = "test",
    limit: int | None = None,
    max_tokens: int = 0,
    metric: Literal["exact", "contains", "loss"] = "exact",
    answer_after: str | None = None,
    stop: Annotated[tuple[str, ...], Parameter(negative=())] = (),
    batch_size: int = 8,
    out: str | None = None,
    json: bool = False,
    device: Literal["cpu", "gpu"] | None = None,
    backend: Literal["auto", "mlx", "torch"] | None = None,
) -> int:
    """Score a model and its adapters on held-out rows: exact match, loss, perplexity, speed.

    Each row's prompt is what training sees before the answer (chat: the conversation up to the
    last assistant turn with the run's template; completions and instruction rows: the prompt;
    text rows: up to --answer-after); the rest is the reference. Rows are rendered as each
    adapter's training rendered them: a FineTune run's recipe.toml, or mlx-lm's way (the
    tokenizer's chat template) for an adapter directory `mlx_lm lora` wrote; the base as its
    adapters, with one row per rendering when they differ. The table says which. Answers are decoded greedily in
    batches and end at EOS, an end-of-turn marker, a --stop string, or the first newline when the
    reference is one line. Exact match compares after collapsing whitespace. Prints one table row
    for the base and one per adapter. Ctrl-C keeps what is done, prints it and exits 130.

    Parameters
    ----------
    model
        Base model: local HF dir, a .gguf file, cached hub id, or tiny.
    data
        Bundled dataset name, .jsonl/.json file, or directory with train/valid/test.jsonl.
    adapter
        Run or adapter directory (FineTune's, or one mlx_lm lora wrote) to score beside the base; repeat or list several.
    split
        Split of a dataset directory to evaluate (a single file is evaluated whole).
    limit
        Evaluate only the first N rows that have an answer.
    max_tokens
        Most tokens generated per row; 0: the longest reference's length plus 8.
    metric
        exact (exact-match column), contains (the reference appears in the answer), or loss (no generation: loss and perplexity only).
    answer_after
        Text rows: the marker after which the answer begins, e.g. 'A: ' (default: the run's recipe's answer_after).
    stop
        Also end an answer at this string; repeat for several.
    batch_size
        Rows decoded together (and per loss batch).
    out
        Write every prediction to this JSON-lines file as it is made (model, line, prediction, reference, exact, contains, tokens); a missing folder is created.
    json
        Print the result as JSON instead of a table.
    device
        cpu or gpu; default: a GPU when the engine has one, else the CPU.
    backend
        Engine: mlx, torch (transformers; float checkpoints) or auto (default; $FT_BACKEND).
    """
    from finetune.shell.data import report
    from finetune.shell.evaluation import run, table

    options = run.Options(split=split, limit=limit, max_tokens=max_tokens, metric=metric,
                          answer_after=answer_after, stop=tuple(stop), batch_size=batch_size,
                          out=out or "", backend=backend, device=device)
    result = run.evaluate(model, data, list(adapter), options, lambda line: print(line, file=sys.stderr))
    if json:
        print(table.as_json(result))
    else:
        table.show(result, report.console())
    return 0 if result.complete else 130
