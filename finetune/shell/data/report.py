"""Rich rendering of `ft train validate` and `ft train list-data` results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from finetune.files.paths import write_text
from finetune.shell.data.check import ValidationReport

METRICS = "metrics.jsonl"

STYLE = {"error": "bold red", "warning": "yellow", "hint": "cyan"}


def console(stderr: bool = False) -> Console:
    return Console(file=sys.stderr if stderr else sys.stdout, soft_wrap=True, highlight=False)


def show_check(report: ValidationReport, out: Console, max_errors: int = 20) -> None:
    r = report.recipe
    out.print(f"[bold]Recipe[/bold] {r.name} (profile {r.profile})  [bold]model[/bold] {report.model}")
    for split, path in report.files.items():
        out.print(f"  {split}: {path}")
    splits = report.splits
    rows = Table(title="Data", title_justify="left")
    rows.add_column("")
    for split in splits:
        rows.add_column(split, justify="right")
    metrics = {
        "rows": lambda s: f"{s.rows:,}",
        "usable": lambda s: f"{s.usable:,}",
        "bad rows": lambda s: str(sum(s.errors.values())),
        "formats": lambda s: ", ".join(f"{k} {n:,}" for k, n in s.formats.items()) or "-",
        "tokens": lambda s: f"{s.tokens:,}",
        "supervised": lambda s: f"{s.supervised:,} ({s.supervised_share:.1%})",
        "length min/med/p95/max": lambda s: f"{s.length_min}/{s.length_median}/{s.length_p95}/{s.length_max}",
        "truncated": lambda s: str(s.truncated),
        "nothing to learn": lambda s: str(s.nothing_to_learn),
    }
    for label, cell in metrics.items():
        rows.add_row(label, *(cell(s) for s in splits.values()))
    out.print(rows)
    if report.templates:
        out.print("[bold]Templates[/bold] " + ", ".join(f"{fmt}: {t}" for fmt, t in report.templates.items()))
    if report.row_errors:
        out.print(f"[bold red]Bad rows[/bold red] ({len(report.row_errors)})")
        for e in report.row_errors[:max_errors]:
            out.print(f"  {e}", markup=False)
        if len(report.row_errors) > max_errors:
            out.print(f"  ... and {len(report.row_errors) - max_errors} more")
    if report.facts and report.estimate:
        f, m = report.facts, report.estimate
        share = m.trainable / max(1, f.parameters)
        out.print(
            f"[bold]Model[/bold] {f.model_type}, {f.parameters / 1e6:.1f}M parameters, {f.num_layers} layers, "
            f"context {f.context_length}; "
            + (f"a full fine-tune trains {m.trainable:,} of its weights" if m.fine_tune_type == "full" else f"LoRA trains {m.trainable:,} parameters")
            + f" ({share:.2%} of the base)"
        )
        state = "gradients+optimizer" if m.fine_tune_type == "full" else "adapters+optimizer"
        out.print(
            f"[bold]Memory estimate[/bold] {m.total_gb:.2f} GB (weights {m.weights_gb:.2f}, {state} "
            f"{m.lora_gb:.2f}, activations {m.activations_gb:.2f} at batch {r.train.batch_size} × {report.seq_len or r.train.max_seq_length} tokens)"
        )
    if report.findings:
        table = Table(title="Findings", title_justify="left")
        for col in ("level", "field", "message"):
            table.add_column(col)
        for f in report.findings:
            table.add_row(f"[{STYLE[f.level]}]{f.level}[/]", f.field, f.message)
        out.print(table)
    errors = sum(1 for f in report.findings if f.level == "error")
    if errors:
        out.print(f"[bold red]{errors} error(s): fix them before training.[/bold red]")
    else:
        out.print("[bold green]OK: ready to train.[/bold green]")


def show_catalog(entries, out: Console) -> None:
    if not entries:
        out.print("No datasets found.")
        return
    table = Table(title="Datasets", title_justify="left")
    for col in ("name", "origin", "split", "rows", "bad", "formats"):
        table.add_column(col, justify="right" if col in ("rows", "bad") else "left", overflow="fold")
    for d in entries:
        for i, s in enumerate(d.splits):
            formats = ", ".join(f"{k} {n}" for k, n in s.formats.items()) or "-"
            table.add_row(d.name if i == 0 else "", d.origin if i == 0 else "", s.split, f"{s.rows:,}", str(s.bad), formats)
    out.print(table)
    for d in entries:  # full paths outside the table, where they are never cut
        for s in d.splits:
            out.print(f"{d.name} {s.split}: {s.path}", markup=False)


def start_metrics(run_dir: Path) -> None:
    """An empty metrics.jsonl: a new run's reports are appended from here."""
    write_text(run_dir / METRICS, "")


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One report as one JSON line, appended and flushed (never a rewrite of the whole file)."""
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def metrics_until(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """The reports up to `step` (a resumed checkpoint's); the file is rewritten, atomically, to match.

    A line that does not decode (cut short when the process was killed mid-write) is dropped.
    """
    path = run_dir / METRICS
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                rows.append(row)
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows
