"""The progress bars commands draw on stderr (terminals only)."""

from __future__ import annotations

import sys
from typing import Any


def bars() -> Any:
    """A rich `Progress`, transient, on stderr and disabled off a terminal: each task's description,
    bar, done/total, time left and its `status` field."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(file=sys.stderr), transient=True, disable=not sys.stderr.isatty(),
    )
