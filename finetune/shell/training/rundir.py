"""The run directory, above both engines: the step count, the resume fingerprint, the report
rows of metrics.jsonl, Ctrl-C handling."""

from __future__ import annotations

import hashlib
import math
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct
from returns.result import Failure, Result, Success

from finetune.core import batching
from finetune.core import recipe as core_recipe
from finetune.core.config import Recipe
from finetune.core.tokenize import Tokens
from finetune.engines.protocol import Data, World, describe_world
from finetune.errors import Interrupted as RunInterrupted
from finetune.shell import plot
from finetune.shell.training import checkpoints

# Recipe fields that may change between a checkpoint and its resumption (`compile` changes how
# the same step is computed, not what it computes: results agree to float rounding).
CADENCE = ("report_every", "eval_every", "val_batches", "save_every", "keep_checkpoints", "iters", "epochs", "compile",
           "eval_generate", "answer_after")


class Cursor(Struct, kw_only=True):
    """Where a run is: optimizer steps done and micro-batches consumed (for exact resume)."""

    step: int = 0
    batch_index: int = 0
    trained_tokens: int = 0
    splits: int = 1  # micro-steps per batch in use: a resumed run keeps a split raised at run time


class StepReport(Struct, frozen=True, kw_only=True):
    """One row of metrics.jsonl."""

    step: int
    epoch: float
    train_loss: float
    learning_rate: float
    tokens_per_second: float  # supervised tokens
    processed_tokens_per_second: float
    iterations_per_second: float
    trained_tokens: int
    peak_memory_gb: float
    padding_efficiency: float
    val_loss: float | None = None
    val_exact_match: float | None = None  # --eval-generate; left out of metrics.jsonl when None


class Outcome(Struct, frozen=True, kw_only=True):
    run_dir: str
    steps: int
    train_loss: float
    val_loss: float | None
    test_loss: float | None = None
    trainable: int = 0


def finish(run_dir: Path, steps: int, metrics: list[dict[str, Any]], trainable: int,
           test_loss: float | None, log: Callable[[str], None]) -> Outcome:
    """The end of a run in either engine: the loss curve and test loss logged, the Outcome."""
    curve = plot.text_curve(metrics)
    if curve:
        log(curve)
    if test_loss is not None:
        log(f"Test loss {test_loss:.3f}, Test ppl {math.exp(test_loss):.3f}")
    last = metrics[-1] if metrics else {}
    return Outcome(
        run_dir=str(run_dir), steps=steps, train_loss=last.get("train_loss", math.nan),
        val_loss=last.get("val_loss"), test_loss=test_loss, trainable=trainable,
    )


def with_exact_match(r: StepReport, score: Callable[[], float] | None) -> StepReport:
    """The report with `--eval-generate`'s exact match, measured now, when `score` is given."""
    return r if score is None else msgspec.structs.replace(r, val_exact_match=score())


def stopped(stop: Interrupted, run_dir: Path) -> RunInterrupted:
    """The user-facing error for a Ctrl-C that stopped the loop after saving a checkpoint."""
    return RunInterrupted(f"interrupted at step {stop.args[0]}: checkpoint saved in {run_dir}; continue with --resume")


def run_digest(recipe: Recipe, splits: dict[str, list[Tokens]], shapes: list[str]) -> bytes:
    """A hash of what every rank must share: the recipe (but names and paths), the tokens, the
    model's parameter `shapes` (one string each)."""
    raw = core_recipe.to_builtins(recipe)
    for key in ("name", "output"):
        raw.pop(key, None)
    for section in ("model", "data"):
        raw.get(section, {}).pop("path", None)  # hosts may keep the same files in different places
    h = hashlib.sha256(msgspec.json.encode(raw))
    for split in sorted(splits):
        h.update(split.encode())
        for t in splits[split]:
            h.update(msgspec.json.encode((t.ids, t.mask)))
    for line in shapes:
        h.update(line.encode())
    return h.digest()


def disagreement(what: str, ranks: list[int]) -> str:
    """The one line for ranks whose digest differs from rank 0's."""
    return (f"rank {', '.join(map(str, ranks))} and rank 0 disagree about {what}; start every rank with the same "
            "recipe, data and model (same files on every host)")


def check_world(world: World, rows: int) -> Result[None, str]:
    """Every rank gets at least one row of a full batch."""
    if world.size > rows:
        return Failure(f"$.train.batch_size: {rows} rows per batch cannot be shared by {world.size} ranks "
                       f"(a rank would never train); use --batch-size {world.size} or more, or fewer ranks")
    return Success(None)

def total_steps(recipe: Recipe, plan_size: int) -> int:
    t = recipe.train
    return t.iters or math.ceil(plan_size * t.epochs / t.grad_accumulation)


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What must not change between a checkpoint and its resumption."""
    raw = core_recipe.to_builtins(recipe)
    raw.pop("name"), raw.pop("output")
    for key in CADENCE:
        raw["train"].pop(key)
    return raw


def first_difference(old: Any, new: Any, path: str = "$") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}")
    return f"{path} was {old!r}, now {new!r}"


def check_output(run_dir: Path, resume: bool) -> Result[None, str]:
    """Refuse to overwrite a finished or started run unless resuming it."""
    started = (run_dir / "adapters.safetensors").exists() or bool(checkpoints.complete(run_dir))
    if resume and not checkpoints.complete(run_dir):
        return Failure(f"{run_dir}: no checkpoint to resume from")
    if started and not resume:
        return Failure(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")
    return Success(None)


class Window:
    """Sums between two reports."""

    def __init__(self) -> None:
        self.loss = self.tokens = self.seconds = 0.0
        self.supervised = self.processed = self.slots = self.steps = 0

    def add(self, loss: float, tokens: float, batch: batching.Batch) -> None:
        self.loss += loss
        self.tokens += tokens
        self.supervised += batch.supervised
        self.processed += batch.tokens
        self.slots += batch.inputs.size

    def report(self, cursor: Cursor, plan_size: int, lr: float, val: float | None, peak_gb: float,
               reduce: Callable[[list[float]], list[float]] | None = None) -> StepReport:
        """The report of this window; `reduce` sums the counts over data-parallel ranks."""
        if reduce is not None:  # every rank reports at the same steps: the sums are the whole batches'
            self.loss, self.tokens, *counts = reduce([self.loss, self.tokens, self.supervised, self.processed, self.slots])
            self.supervised, self.processed, self.slots = (int(c) for c in counts)
        seconds = max(self.seconds, 1e-9)
        return StepReport(
            step=cursor.step,
            epoch=cursor.batch_index / plan_size,
            train_loss=self.loss / self.tokens if self.tokens else math.nan,
            learning_rate=lr,
            tokens_per_second=self.supervised / seconds,
            processed_tokens_per_second=self.processed / seconds,
            iterations_per_second=self.steps / seconds,
            trained_tokens=cursor.trained_tokens,
            peak_memory_gb=peak_gb,
            padding_efficiency=self.processed / self.slots if self.slots else 0.0,
            val_loss=val,
        )


def log_start(log: Callable[[str], None], trainable: int, total: int, steps: int, train: Data, world: World,
              full: bool = False) -> None:
    """The line both engines print before the first step (`total`: every parameter, LoRA included;
    the share is of the base's, as `ft train validate` states it; `full`: the base's own weights train)."""
    base = total if full else total - trainable
    what = "of the base's parameters (full fine-tune)" if full else "LoRA parameters"
    log(f"Training {trainable:,} {what} ({trainable / max(1, base):.2%} of the base) for {steps} steps "
        f"on {len(train.examples):,} rows in {len(train.plan):,} batches"
        + (f", {describe_world(world)}" if world.size > 1 else ""))


def recorder(run_dir: Path, metrics: list[dict[str, Any]], world: World, log: Callable[[str], None]) -> Callable[[StepReport], None]:
    """What both engines do with a report: a metrics row (with the world), appended to
    metrics.jsonl by rank 0 alone, and the log lines."""
    from finetune.shell.data import report

    def record(r: StepReport) -> None:
        row = {**msgspec.to_builtins(r), "world_size": world.size, "distributed_backend": world.backend}
        if row["val_exact_match"] is None:
            del row["val_exact_match"]
        metrics.append(row)
        if world.rank == 0:
            report.append_metrics(run_dir, row)
        log_report(r, log)

    return record


def log_report(r: StepReport, log: Callable[[str], None]) -> None:
    """mlx-lm's classic log lines for one report (and its validation loss)."""
    log(f"Iter {r.step}: Train loss {r.train_loss:.3f}, Learning Rate {r.learning_rate:.3e}, "
        f"It/sec {r.iterations_per_second:.3f}, Tokens/sec {r.tokens_per_second:.3f}, "
        f"Trained Tokens {r.trained_tokens}, Peak mem {r.peak_memory_gb:.3f} GB")
    if r.val_loss is not None:
        log(f"Iter {r.step}: Val loss {r.val_loss:.3f}")
    if r.val_exact_match is not None:
        log(f"Iter {r.step}: Val exact match {r.val_exact_match:.3f}")


class Interrupted(Exception):
    """Ctrl-C arrived; the loop stopped at a step boundary."""


class StopFlag:
    """Turns the first Ctrl-C into a request to stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint (Ctrl-C again to abort).", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
