"""What ranks agree on before a run writes anything, over any engine's sum across ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from returns.result import Failure, Result, Success

from finetune.engines.protocol import World
from finetune.shell.training.rundir import disagreement

Sum = Callable[[list[float]], list[float]]  # values summed over ranks (float64)


def agree(world: World, sum_values: Sum, what: str, digest: bytes) -> Result[None, str]:
    """Every rank holds the same `digest` of `what`, or a Failure naming the ranks that differ.

    Each rank writes its bytes into its own slot of a zero vector; the sum is every rank's digest.
    """
    if world.size == 1:
        return Success(None)
    n = len(digest)
    slots = [0.0] * (n * world.size)
    slots[world.rank * n:(world.rank + 1) * n] = [float(b) for b in digest]
    every = sum_values(slots)
    rows = [every[r * n:(r + 1) * n] for r in range(world.size)]
    differ = [r for r, d in enumerate(rows) if d != rows[0]]
    return Failure(disagreement(what, differ)) if differ else Success(None)


def all_ok(world: World, sum_values: Sum, result: Result[Any, str]) -> Result[Any, str]:
    """`result` where every rank succeeded; else a Failure (its own message, or the failing ranks)."""
    if world.size == 1:
        return result
    flags = [0.0] * world.size
    flags[world.rank] = float(isinstance(result, Failure))
    failed = [r for r, f in enumerate(sum_values(flags)) if f]
    if not failed or isinstance(result, Failure):
        return result
    return Failure(f"rank {', '.join(map(str, failed))} stopped (its error is above); this rank stops with it")
