"""Fit a run into a memory limit before the weights load (pure).

A planned batch can be trained as several micro-steps (`batching.shares`) whose gradients and
token counts add up to the whole batch's, so the effective batch and the data plan never
change: only how many rows go through the model at once. The planner picks the largest
micro-batch that fits, turns on gradient checkpointing only when one row does not fit without
it, and otherwise says how much memory the run needs at least.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import batching, memory
from finetune.core.config import Recipe
from finetune.core.modelinfo import ModelFacts
from finetune.core.tokenize import Tokens

Row = tuple[int, int]  # (tokens in the row, supervised targets in it)


class MemoryPlan(Struct, frozen=True, kw_only=True):
    """How a run's batches go through the model: `splits` micro-steps of ≤ `micro_batch` rows."""

    limit_gb: float
    batch_size: int  # rows per planned batch (the recipe's)
    grad_accumulation: int  # planned batches per optimizer step (the recipe's)
    micro_batch: int  # rows per micro-step
    splits: int  # micro-steps per planned batch
    grad_checkpoint: bool
    estimate: memory.MemoryEstimate  # the peak of the largest micro-step

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accumulation


def workload(plan: Sequence[Sequence[Sequence[int]]], examples: Sequence[Tokens], max_length: int) -> list[list[Row]]:
    """Each planned batch as its rows' (tokens, supervised) after truncation to `max_length`."""
    out = []
    for batch in plan:
        rows = []
        for row in batch:
            tokens = supervised = 0
            for i in row:
                n = min(len(examples[i].ids), max_length - tokens)
                supervised += sum(examples[i].mask[1:n]) if n else 0  # a row's first token is no target
                tokens += n
            rows.append((tokens, supervised))
        out.append(rows)
    return out


def micro_shape(batches: Sequence[Sequence[Row]], splits: int) -> tuple[int, int, int]:
    """(rows, padded length, padded supervised positions) bounding every micro-step of `splits`."""
    rows = width = chosen = 0
    for batch in batches:
        for share in batching.shares(batch, splits):
            if not share:
                continue
            longest = max(t for t, _ in share)
            rows = max(rows, len(share))
            width = max(width, batching.PAD_MULTIPLE * -(-(longest - 1) // batching.PAD_MULTIPLE))
            count = sum(s for _, s in share)
            chosen = max(chosen, 64 * max(1, -(-count // 64)))
    return rows, width, chosen


def plan(
    facts: ModelFacts, recipe: Recipe, batches: Sequence[Sequence[Row]], limit_gb: float, dtype: str = "float32",
    copies: Mapping[str, float] = memory.COPIES,
    reserved_gb: float = 0.0,
    trained_dtype: str | None = None,
    activation_bytes: float | None = None,
) -> Result[MemoryPlan, str]:
    """The largest micro-batch whose estimated peak fits `limit_gb` (see the module docstring);
    `copies`: the engine's activation copy counts (`memory.estimate`); `reserved_gb`: what the
    limit holds before the weights load (the torch engine's process on the CPU), in every estimate;
    `trained_dtype`, `activation_bytes`: as `memory.estimate`'s."""
    size = max((len(b) for b in batches), default=recipe.train.batch_size)
    weights = memory.weight_bytes(facts, recipe.model.quantize_bits, memory.group_size(recipe), dtype) / memory.GB
    held = f" and the {reserved_gb:.3g} GB the process needs besides" if reserved_gb else ""
    if limit_gb <= weights + reserved_gb:
        return Failure(f"--memory-limit {limit_gb:.3g} GB is below the model's {weights:.3g} GB of weights{held}; "
                       "raise it, or quantize the base (--quantize-bits 4)")
    modes = (True,) if recipe.train.grad_checkpoint else (False, True)
    smallest = None
    for checkpoint in modes:
        r = msgspec.structs.replace(recipe, train=msgspec.structs.replace(recipe.train, grad_checkpoint=checkpoint))
        previous = 0
        for splits in range(1, size + 1):
            if -(-size // splits) == previous:
                continue  # the same largest share as one split fewer
            rows, width, chosen = micro_shape(batches, splits)
            previous = rows
            est = memory.estimate(facts, r, width, dtype, chosen, rows, copies, trained_dtype, activation_bytes)
            est = msgspec.structs.replace(est, total_gb=est.total_gb + reserved_gb)
            if est.total_gb <= limit_gb:
                return Success(MemoryPlan(
                    limit_gb=limit_gb, batch_size=recipe.train.batch_size,
                    grad_accumulation=recipe.train.grad_accumulation, micro_batch=rows, splits=splits,
                    grad_checkpoint=checkpoint, estimate=est,
                ))
            smallest = est.total_gb if smallest is None else min(smallest, est.total_gb)
    return Failure(f"the run needs at least {smallest:.3g} GB (one row per micro-step with gradient "
                   f"checkpointing{held.replace(' and', ', with', 1)}), more than --memory-limit {limit_gb:.3g} GB; raise the limit, "
                   "lower --max-seq-length, or quantize the base (--quantize-bits 4)")


def describe(p: MemoryPlan) -> str:
    """One line for the log."""
    steps = f"{p.splits} micro-steps of ≤{p.micro_batch} rows per batch of {p.batch_size}" if p.splits > 1 else f"batches of {p.batch_size} rows in one step"
    ckpt = ", gradient checkpointing" if p.grad_checkpoint else ""
    return (f"memory plan: {steps}{ckpt} (effective batch {p.effective_batch}); estimated peak "
            f"{p.estimate.total_gb:.3g} GB of {p.limit_gb:.3g} GB ({memory.trained_state(p.estimate)})")
