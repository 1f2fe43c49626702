"""Loss curves: a text plot for the end of a run, a PNG comparing runs (`ft train plot`)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from returns.result import Failure, Result, Success

from finetune.errors import UserError
from finetune.files.paths import write_bytes

# matplotlib's tab10: one colour per run, in the order the runs are given.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
TRAIN, VALID, BOTH = "*", "o", "#"

Series = list[tuple[int, float]]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> Series:
    """(step, loss) of every report that has a finite `key` (val_loss is absent on most reports)."""
    out = []
    for r in rows:
        value = r.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out.append((int(r["step"]), float(value)))
    return out


def text_curve(rows: Sequence[Mapping[str, Any]], width: int = 60, height: int = 12) -> str:
    """Train and validation loss against step as plain text (reads the same in a log file).

    Empty when there are fewer than two points: one report is no curve.
    """
    train, valid = series(rows, "train_loss"), series(rows, "val_loss")
    points = train + valid
    if len(points) < 2:
        return ""
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi == lo:  # a flat curve sits in the middle of a small range around it
        lo, hi = lo - (abs(lo) * 0.05 or 0.1), hi + (abs(hi) * 0.05 or 0.1)
    grid = [[" "] * width for _ in range(height)]

    def put(data: Series, mark: str) -> None:
        for step, value in data:
            col = round((step - first) / max(1, last - first) * (width - 1))
            row = round((hi - value) / (hi - lo) * (height - 1))
            cell = grid[row][col]
            grid[row][col] = mark if cell in (" ", mark) else BOTH

    put(train, TRAIN)
    put(valid, VALID)
    labels = {i: hi - i / (height - 1) * (hi - lo) for i in (0, (height - 1) // 2, height - 1)}
    pad = max(len(f"{v:.3f}") for v in labels.values())
    lines = [f"Loss by step: {TRAIN} train" + (f", {VALID} validation" if valid else "") + f" ({BOTH} both)"]
    for i, cells in enumerate(grid):
        label = f"{labels[i]:.3f}".rjust(pad) if i in labels else " " * pad
        lines.append(f"{label} {'┤' if i in labels else '│'}{''.join(cells).rstrip()}")
    lines.append(" " * pad + " └" + "─" * width)
    steps = f"{first}".ljust(width - len(str(last))) + f"{last}"
    lines.append(" " * (pad + 2) + steps + "  step")
    exact = series(rows, "val_exact_match")  # --eval-generate
    if exact:
        lines.append("Val exact match by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in exact))
    return "\n".join(lines)


def read_metrics(run: Path) -> Result[list[dict[str, Any]], str]:
    """A run directory's metrics.jsonl, one dict per report; every problem names the file."""
    if not run.exists():
        return Failure(f"{run}: no such run directory")
    if not run.is_dir():
        return Failure(f"{run}: not a run directory; give the --output directory of `ft train start`")
    path = run / "metrics.jsonl"
    if not path.is_file():
        return Failure(f"{run}: no metrics.jsonl here; is it the --output directory of `ft train start`?")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return Failure(f"{path}:{n}: not a JSON object ({err.msg})")
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not isinstance(row.get("train_loss"), int | float):
            return Failure(f"{path}:{n}: a report needs a whole-number step and a numeric train_loss")
        rows.append(row)
    if not rows:
        return Failure(f"{path}: no reports yet; a run writes one every train.report_every steps")
    return Success(rows)


def figure(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Any:
    """A matplotlib Figure: per run one colour, train loss solid, validation loss dashed with dots,
    and validation exact match (`--eval-generate`) dotted with triangles on a right-hand axis."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("ft train plot needs matplotlib: pip install 'finetune-lora[plot]'") from None
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for i, (name, rows) in enumerate(runs.items()):
        colour = COLOURS[i % len(COLOURS)]
        train, valid = series(rows, "train_loss"), series(rows, "val_loss")
        ax.plot(*zip(*train, strict=True), color=colour, linewidth=2, label=f"{name} train")
        if valid:
            ax.plot(*zip(*valid, strict=True), color=colour, linewidth=2, linestyle="--", marker="o",
                    label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Loss by step")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    exact = {name: series(rows, "val_exact_match") for name, rows in runs.items()}
    if any(exact.values()):  # --eval-generate: exact match on its own axis at the right, dotted
        right = ax.twinx()
        for i, (name, points) in enumerate(exact.items()):
            if points:
                right.plot(*zip(*points, strict=True), color=COLOURS[i % len(COLOURS)], linestyle=":", marker="^",
                           label=f"{name} exact match")
        right.set_ylabel("validation exact match")
        right.set_ylim(-0.02, 1.02)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    fig.tight_layout()
    return fig


def write_png(fig: Any, output: Path) -> Path:
    """Render with Agg (no display, no pyplot state) and write the PNG atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return write_bytes(output, buffer.getvalue())


def run_names(runs: Sequence[str]) -> list[str]:
    """Each run's directory name, or the path as given where two names would collide."""
    names = [Path(r).name or r for r in runs]
    return [n if names.count(n) == 1 else r for n, r in zip(names, runs, strict=True)]
