"""`ft train plot`: compare runs' loss curves in one PNG."""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError, unwrap


def plot(*runs: Path, output: Path = Path("loss.png")) -> int:
    """Write a PNG comparing runs: train and validation loss by step, one colour per run.

    Runs trained with --eval-generate also show validation exact match on a right-hand axis.
    Needs matplotlib (pip install 'finetune-lora[plot]').

    Parameters
    ----------
    runs
        Run directories (the --output of ft train start), each holding metrics.jsonl.
    output
        PNG file to write (replaced atomically).
    """
    from finetune.shell import plot as curves

    if not runs:
        raise UserError("give at least one run directory, e.g. ft train plot runs/quick --output loss.png")
    if output.suffix.lower() != ".png":
        raise UserError(f"--output {output}: the plot is a PNG; name the file *.png")
    names = curves.run_names([str(r) for r in runs])
    metrics = {name: unwrap(curves.read_metrics(run)) for name, run in zip(names, runs, strict=True)}
    curves.write_png(curves.figure(metrics), output)
    print(f"Wrote {output}: loss of {', '.join(names)}")
    return 0
