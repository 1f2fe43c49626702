"""The one training loop, over an engine's `Trainer`: batches, micro-steps, reports,
validation, checkpoints, Ctrl-C. No MLX, no torch."""

from __future__ import annotations

import time
from collections.abc import Callable

from finetune.core import batching
from finetune.core.config import TrainingConfig
from finetune.engines.protocol import Data, Trainer, batch_share
from finetune.shell.training import rundir
from finetune.shell.training.rundir import Cursor, Interrupted, StepReport, StopFlag, Window


def run_steps(
    trainer: Trainer,
    train_data: Data,
    valid_data: Data | None,
    cfg: TrainingConfig,
    total_steps: int,
    cursor: Cursor,
    on_report: Callable[[StepReport], None],
    on_save: Callable[[Cursor], None],
    on_step: Callable[[Cursor], None] = lambda c: None,
    on_log: Callable[[str], None] = lambda line: print(line, flush=True),
    splits: int = 1,
    memory_limit_gb: float = 0.0,
    exact_match: Callable[[], float] | None = None,
) -> Cursor:
    """Run optimizer steps `cursor.step + 1 .. total_steps`; returns the final cursor.

    Batches come from `(seed, batch_index)` alone, so a resumed run sees exactly the batches the
    uninterrupted run would have; dropout is seeded from `(seed, step, rank)`. With several ranks
    each takes its share of every batch (the engine sums gradients and token counts over ranks
    before the one division). `splits`: micro-steps per planned batch (the memory plan); when
    the measured peak passes `memory_limit_gb`, the split doubles: the shares add up to the
    batch, so neither the optimisation nor the data cursor changes. Token counts come from the
    host's batches and the loss is asked of the engine only at report steps: no sync per step.
    """
    world = trainer.world
    splits = cursor.splits = max(splits, cursor.splits)
    accum, plan_size = cfg.grad_accumulation, len(train_data.plan)
    window, stop = Window(), StopFlag()
    with stop:
        if valid_data and cursor.step == 0 and cfg.eval_every:
            tic = time.perf_counter()
            val = trainer.evaluate(valid_data, cfg.max_seq_length, cfg.val_batches)
            on_log(f"Iter 0: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
        while cursor.step < total_steps:
            tic = time.perf_counter()
            # Dropout from (seed, step, rank) alone: a resumed run draws the masks an uninterrupted
            # one would. Ranks draw different masks (their rows differ); one process keeps its seeds.
            trainer.seed((cfg.seed * 1_000_003 + cursor.step) * world.size + world.rank)
            batches = []
            for _ in range(accum):
                index = batching.batch_at(plan_size, cfg.seed, cursor.batch_index)
                for part in range(splits):  # this rank's share, in `splits` micro-steps
                    b = batch_share(train_data, index, cfg.max_seq_length, world.rank, world.size, part, splits)
                    batches.append(b)
                    window.add(0.0, float(b.weights.sum()), b)
                cursor.batch_index += 1
            done = trainer.step(batches, stop.requested)
            cursor.trained_tokens += int(done.tokens)
            cursor.step += 1
            window.steps += 1
            if memory_limit_gb and trainer.peak_gb() > memory_limit_gb and splits < cfg.batch_size:
                splits = cursor.splits = min(cfg.batch_size, 2 * splits)
                on_log(f"Peak memory {trainer.peak_gb():.2f} GB passed the {memory_limit_gb:.2f} GB limit: "
                       f"{splits} micro-steps per batch from now on (same effective batch)")
                trainer.reset_peak()
            last = cursor.step == total_steps
            if cursor.step % cfg.report_every == 0 or last:  # the one read of the loss per report,
                window.loss += trainer.loss()  # inside the timing
            window.seconds += time.perf_counter() - tic
            on_step(cursor)
            val = None
            if valid_data and ((cfg.eval_every and cursor.step % cfg.eval_every == 0) or last):
                val = trainer.evaluate(valid_data, cfg.max_seq_length, cfg.val_batches)
            if cursor.step % cfg.report_every == 0 or last or val is not None:
                window.loss += trainer.loss()  # a validation step between reports: its loss too
                reduce = trainer.sum_values if world.size > 1 else None
                report = window.report(cursor, plan_size, trainer.learning_rate(cursor.step), val,
                                       trainer.peak_gb(), reduce)
                on_report(rundir.with_exact_match(report, exact_match if val is not None else None))
                window = Window()
            if (cfg.save_every and cursor.step % cfg.save_every == 0) or last:
                on_save(cursor)
            if (stop.requested if world.size == 1 else done.stopping) and not last:
                on_save(cursor)
                if world.size > 1:  # the others wait until rank 0 has saved: the launcher ends all at the first exit
                    trainer.sum_values([0.0])
                raise Interrupted(cursor.step)
    return cursor
