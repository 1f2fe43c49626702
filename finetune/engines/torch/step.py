"""The torch train step and loop: the MLX engine's loss, accumulation, clipping, optimizer
(`optim.py`) and schedule, step for step, on the core's batch plan."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from finetune.core import batching
from finetune.core.config import TrainingConfig
from finetune.engines import rundir
from finetune.engines.rundir import (
    SINGLE,
    Cursor,
    Data,
    Interrupted,
    StepReport,
    StopFlag,
    Window,
    World,
)
from finetune.engines.torch import budget, distributed
from finetune.engines.torch.lora import Lora
from finetune.engines.torch.loss import head_ce
from finetune.engines.torch.optim import Optimizer, clip_


def batch_tensors(data: Data, index: int, max_length: int, device: torch.device, world: World = SINGLE,
                  part: int = 0, parts: int = 1) -> tuple[batching.Batch, tuple[torch.Tensor, ...]]:
    """Micro-step `part` of `parts` of this rank's share of the plan's batch `index`, as numpy (for
    counts: the loop never asks the device for them) and tensors (for the step; pinned and
    copied without waiting on CUDA)."""
    b = rundir.batch_share(data, index, max_length, world.rank, world.size, part, parts)
    arrays = [b.inputs.astype(np.int64), b.select.astype(np.int64), b.targets.astype(np.int64), b.weights]
    if b.positions is not None:
        arrays.append(b.positions.astype(np.int64))
    if device.type == "cuda":
        return b, tuple(torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays)
    return b, tuple(torch.from_numpy(a).to(device) for a in arrays)


def supervised_ce(model: Lora, inputs, select, targets, weights, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy, number of targets): the LM head only at supervised positions.

    Packed rows carry `positions` that restart per document; transformers reads the restarts
    as document boundaries (block-diagonal causal attention). The head and the loss run over
    chunks of the positions (`loss.head_ce`): the (N, V) logits are never whole.
    """
    h = model.hidden(inputs, positions)  # (B, T, D)
    h = h.reshape(-1, h.shape[-1])[select]  # (N, D)
    return head_ce(model.lm.get_output_embeddings(), h, targets, weights), weights.sum()


@torch.no_grad()
def evaluate(model: Lora, data: Data, max_length: int, num_batches: int, device: torch.device,
             world: World = SINGLE) -> float:
    """Token-weighted mean loss over the first `num_batches` batches (-1 = all), in plan order.

    Each rank evaluates its share of every batch; the sums are added across ranks.
    """
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0.0
    n = len(data.plan) if num_batches < 0 else min(num_batches, len(data.plan))
    for i in range(n):
        if not batching.shares(data.plan[i], world.size)[world.rank]:
            continue
        numbers, tensors = batch_tensors(data, i, max_length, device, world)
        loss, _ = supervised_ce(model, *tensors)
        total, count = total + loss, count + float(numbers.weights.sum())  # one sync, at the end
    model.train()
    total, count = distributed.sum_values(world, [total.item(), count])
    return total / max(count, 1.0)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak: KiB on Linux
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def run_steps(
    model: Lora,
    optimizer: Optimizer,
    train_data: Data,
    valid_data: Data | None,
    cfg: TrainingConfig,
    total_steps: int,
    cursor: Cursor,
    device: torch.device,
    on_report: Callable[[StepReport], None],
    on_save: Callable[[Cursor], None],
    on_step: Callable[[Cursor], None] = lambda c: None,
    on_log: Callable[[str], None] = lambda line: print(line, flush=True),
    world: World = SINGLE,
    splits: int = 1,
    memory_limit_gb: float = 0.0,
    exact_match: Callable[[], float] | None = None,
) -> Cursor:
    """Run optimizer steps `cursor.step + 1 .. total_steps`, as `shell.trainer.run_steps` does.

    With several ranks each takes its share of every batch; the gradients and token counts
    of all ranks are summed in one all_reduce before the one division. `splits`: micro-steps
    per planned batch (the memory plan); when the measured peak passes `memory_limit_gb`, the
    split doubles (the same effective batch). Token counts come from the host's batch and the
    loss is read from the device only at report steps: no sync per step.
    """
    params = optimizer.params
    splits = cursor.splits = max(splits, cursor.splits)
    pending = torch.zeros((), device=device)  # Σ loss since the last report, on the device
    accum, clip, plan_size = cfg.grad_accumulation, cfg.grad_clip, len(train_data.plan)
    window, stop = Window(), StopFlag()
    model.train()
    with stop:
        if valid_data and cursor.step == 0 and cfg.eval_every:
            tic = time.perf_counter()
            val = evaluate(model, valid_data, cfg.max_seq_length, cfg.val_batches, device, world)
            on_log(f"Iter 0: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
        while cursor.step < total_steps:
            tic = time.perf_counter()
            # Dropout from (seed, step, rank) alone: a resumed run draws the masks an uninterrupted
            # one would. Ranks draw different masks (their rows differ); one process keeps its seeds.
            torch.manual_seed((cfg.seed * 1_000_003 + cursor.step) * world.size + world.rank)
            for p in params.values():
                p.grad = None
            step_tokens = 0.0
            for _ in range(accum):
                index = batching.batch_at(plan_size, cfg.seed, cursor.batch_index)
                for part in range(splits):  # this rank's share, in `splits` micro-steps
                    numbers, tensors = batch_tensors(train_data, index, cfg.max_seq_length, device, world, part, splits)
                    loss, _ = supervised_ce(model, *tensors)
                    loss.backward()
                    tokens = float(numbers.weights.sum())
                    step_tokens += tokens
                    pending += loss.detach()
                    window.add(0.0, tokens, numbers)
                cursor.batch_index += 1
            grads = {k: p.grad for k, p in params.items()}
            step_tokens, stopping = distributed.sum_grads(world, list(grads.values()), step_tokens, stop.requested)
            for g in grads.values():
                g.div_(max(step_tokens, 1.0))  # token-weighted mean
            if clip > 0:
                clip_(grads, clip)
            optimizer.update(grads)
            cursor.trained_tokens += int(step_tokens)
            cursor.step += 1
            window.steps += 1
            if memory_limit_gb and budget.peak_gb(device) > memory_limit_gb and splits < cfg.batch_size:
                splits = cursor.splits = min(cfg.batch_size, 2 * splits)
                on_log(f"Peak memory {budget.peak_gb(device):.2f} GB passed the {memory_limit_gb:.2f} GB limit: "
                       f"{splits} micro-steps per batch from now on (same effective batch)")
                budget.reset_peak(device)
            if cursor.step % cfg.report_every == 0 or cursor.step == total_steps:  # the one sync per report,
                window.loss, pending = window.loss + pending.item(), torch.zeros_like(pending)  # inside the timing
            window.seconds += time.perf_counter() - tic
            on_step(cursor)
            last = cursor.step == total_steps
            val = None
            if valid_data and ((cfg.eval_every and cursor.step % cfg.eval_every == 0) or last):
                val = evaluate(model, valid_data, cfg.max_seq_length, cfg.val_batches, device, world)
            if cursor.step % cfg.report_every == 0 or last or val is not None:
                lr = optimizer.learning_rate(cursor.step - 1)
                reduce = (lambda values: distributed.sum_values(world, values)) if world.size > 1 else None
                window.loss, pending = window.loss + pending.item(), torch.zeros_like(pending)
                report = window.report(cursor, plan_size, lr, val, peak_memory_gb(device), reduce)
                on_report(rundir.with_exact_match(report, exact_match if val is not None else None))
                window = Window()
            if (cfg.save_every and cursor.step % cfg.save_every == 0) or last:
                on_save(cursor)
            if (stop.requested if world.size == 1 else stopping) and not last:
                on_save(cursor)
                raise Interrupted(cursor.step)
    return cursor
