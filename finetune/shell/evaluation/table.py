"""`ft eval`'s output: one table (base, then each adapter), or the same as JSON."""

from __future__ import annotations

import msgspec
from rich.console import Console
from rich.table import Table

from finetune.shell.evaluation.run import Evaluation
from finetune.shell.plot import run_names

COLUMNS = ("model", "rows", "exact match", "contains", "loss", "perplexity", "seconds", "tokens/s")


def show(result: Evaluation, out: Console) -> None:
    """The table; `--metric` picks the score column (exact match or contains; loss shows neither)."""
    shown = [c for c in COLUMNS if not (c == "contains" and result.metric != "contains")
             and not (c == "exact match" and result.metric == "contains")]
    renderings = list(dict.fromkeys(s.rendering for s in result.results))
    title = f"{result.model} on {result.data} ({result.split}, {result.engine})"
    table = Table(title=title, title_justify="left")
    for column in shown:
        model = column == "model"  # numbers never wrap; a long name folds
        table.add_column(column, justify="left" if model else "right", no_wrap=not model, overflow="fold")
    names = run_names([s.name for s in result.results])  # a run directory by its name; JSON keeps paths
    for s, name in zip(result.results, names, strict=True):
        cells = {
            "model": name + _mark(s.rendering, renderings) + ("" if s.complete else " (interrupted)"),
            "rows": str(s.rows if result.metric != "loss" else s.loss_rows),
            "exact match": _share(s.exact), "contains": _share(s.contains),
            "loss": _number(s.loss), "perplexity": _number(s.perplexity),
            "seconds": f"{s.seconds:.1f}",
            "tokens/s": f"{s.tokens_per_second:,.1f}" if s.generated_tokens else "-",
        }
        table.add_row(*(cells[c] for c in shown))
    out.print(table)
    if len(renderings) == 1 and renderings[0]:
        out.print(f"Rows rendered as in training: {renderings[0]}")
    elif len(renderings) > 1:  # adapters trained on differently rendered rows: which row is which
        for note in renderings:
            out.print(f"{_mark(note, renderings).strip()} rows rendered as in training: {note}", markup=False)
    if result.skipped:
        out.print(f"{result.skipped} rows had no assistant turn to answer and were left out.")
    if result.predictions:
        out.print(f"Predictions in {result.predictions}")
    if not result.complete:
        out.print("Interrupted: the table holds the rows done before Ctrl-C.")


def _mark(rendering: str, renderings: list[str]) -> str:
    """` [n]` after a model's name when rows were rendered in more than one way, else nothing."""
    return f" [{renderings.index(rendering) + 1}]" if len(renderings) > 1 else ""


def as_json(result: Evaluation) -> str:
    return msgspec.json.format(msgspec.json.encode(result)).decode()


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
