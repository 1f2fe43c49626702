"""The compiled LoRA train step and the loop around it: reports, validation, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from finetune.core import batching, memory
from finetune.core.config import TrainingConfig
from finetune.engines import rundir
from finetune.engines.mlx import distributed
from finetune.engines.mlx.distributed import World
from finetune.engines.mlx.loss import head_ce
from finetune.engines.rundir import (  # engine-free, shared with the torch engine
    Cursor,
    Data,
    Interrupted,
    StepReport,
    StopFlag,
    Window,
)


def supervised_ce(
    model: nn.Module,
    inputs: mx.array,
    select: mx.array,
    targets: mx.array,
    weights: mx.array,
    segments: mx.array | None = None,
    positions: mx.array | None = None,
    grad: bool = True,
) -> tuple[mx.array, mx.array]:
    """(Σ cross-entropy, number of targets) over the selected positions (the MLX engine's loss;
    the torch engine's `engines/torch/train.supervised_ce` is the same definition).

    The LM head runs only where a target is supervised: `select` holds flat indices into
    `inputs` (B*T), `targets` the next tokens there, `weights` 1 (0 for the padding of
    `select` itself). Padding tokens of `inputs` are never targets. The head and the loss run
    over chunks of those positions (`shell/training/loss.head_ce`); `grad=False` (evaluation) skips its gradient.
    """
    h = model.hidden(inputs, segments, positions)  # (B, T, D)
    h = h.reshape(-1, h.shape[-1])[select]  # (N, D)
    return head_ce(model.head, h, targets, weights, grad=grad), weights.sum()


def batch_arrays(
    data: Data, index: int, max_length: int, rank: int = 0, ranks: int = 1, part: int = 0, parts: int = 1
) -> tuple[batching.Batch, tuple[mx.array, ...]]:
    """Micro-step `part` of `parts` of rank `rank`'s share of the plan's batch `index`
    (`rundir.batch_share`), as numpy (for counts) and MLX arrays."""
    b = rundir.batch_share(data, index, max_length, rank, ranks, part, parts)
    arrays = (b.inputs, b.select, b.targets, b.weights)
    if b.segments is not None:
        arrays += (b.segments, b.positions)
    return b, tuple(mx.array(a) for a in arrays)


def evaluate(model: nn.Module, data: Data, max_length: int, num_batches: int, world: World = distributed.SINGLE) -> float:
    """Token-weighted mean loss over the first `num_batches` batches (-1 = all), in plan order.

    Each rank evaluates its share of every batch; the sums are added across ranks.
    """
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    n = len(data.plan) if num_batches < 0 else min(num_batches, len(data.plan))
    for i in range(n):
        if not batching.shares(data.plan[i], world.size)[world.rank]:
            continue
        _, arrays = batch_arrays(data, i, max_length, world.rank, world.size)
        loss, tokens = supervised_ce(model, *arrays, grad=False)
        total, count = total + loss, count + tokens
        mx.eval(total, count)
    model.train()
    if world.size > 1:
        summed, tokens = distributed.sum_values([total.item(), count.item()])
        return summed / max(tokens, 1.0)
    return (total / mx.maximum(count, 1.0)).item()


def run_steps(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_data: Data,
    valid_data: Data | None,
    cfg: TrainingConfig,
    total_steps: int,
    cursor: Cursor,
    on_report: Callable[[StepReport], None],
    on_save: Callable[[Cursor], None],
    on_step: Callable[[Cursor], None] = lambda c: None,
    on_log: Callable[[str], None] = lambda line: print(line, flush=True),
    world: World = distributed.SINGLE,
    splits: int = 1,
    memory_limit_gb: float = 0.0,
    exact_match: Callable[[], float] | None = None,
) -> Cursor:
    """Run optimizer steps `cursor.step + 1 .. total_steps`; returns the final cursor.

    `splits`: micro-steps per planned batch (the memory plan); when the measured peak passes
    `memory_limit_gb`, the split doubles. Shares add up to the batch, so neither the
    optimisation nor the data cursor changes.

    One compiled function per step (gradient, accumulation, clipping, update) with explicit
    state, one `mx.eval` per micro-batch. Batches come from `(seed, batch_index)` alone, so a
    resumed run sees exactly the batches the uninterrupted run would have. With several ranks
    each takes its share of every batch, and the update's gradients and token counts are
    summed across ranks inside the compiled step before the one division.
    """
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, supervised_ce)
    splits = cursor.splits = max(splits, cursor.splits)
    accum, clip = cfg.grad_accumulation, cfg.grad_clip

    @partial(mx.compile, inputs=state, outputs=state)
    def step(arrays: Sequence[mx.array], acc_grad, acc_tokens, do_update: bool, stops: mx.array):
        (loss, tokens), grad = loss_and_grad(model, *arrays)
        if acc_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, acc_grad)
            tokens_total = tokens + acc_tokens
        else:
            tokens_total = tokens
        if not do_update:
            return loss, tokens, grad, tokens_total, stops
        if world.size > 1:  # Ctrl-C rides along, so every rank stops after the same step
            grad, tokens_total, stops = distributed.sum_tree((grad, tokens_total, stops))
        grad = tree_map(lambda g: g / mx.maximum(tokens_total, 1.0), grad)  # token-weighted mean
        if clip > 0:
            grad, _ = optim.clip_grad_norm(grad, clip)
        optimizer.update(model, grad)
        return loss, tokens, None, tokens_total, stops  # all ranks' supervised tokens and Ctrl-Cs

    plan_size = len(train_data.plan)
    window = Window()
    stop = StopFlag()
    model.train()
    with stop:
        if valid_data and cursor.step == 0 and cfg.eval_every:
            tic = time.perf_counter()
            val = evaluate(model, valid_data, cfg.max_seq_length, cfg.val_batches, world)
            on_log(f"Iter 0: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")
        while cursor.step < total_steps:
            tic = time.perf_counter()
            acc_grad = acc_tokens = None
            # Dropout's randomness follows from (seed, step) alone, so a resumed run draws the
            # same masks as an uninterrupted one without saving the generator's state.
            # Ranks draw different masks (their rows differ); one process keeps its old seeds.
            mx.random.seed((cfg.seed * 1_000_003 + cursor.step) * world.size + world.rank)
            for micro in range(accum):
                index = batching.batch_at(plan_size, cfg.seed, cursor.batch_index)
                for part in range(splits):  # this rank's share, in `splits` micro-steps
                    numbers, arrays = batch_arrays(train_data, index, cfg.max_seq_length,
                                                   world.rank, world.size, part, splits)
                    update = micro == accum - 1 and part == splits - 1
                    loss, tokens, acc_grad, acc_tokens, stops = step(
                        arrays, acc_grad, acc_tokens, update, mx.array(float(stop.requested)))
                    mx.eval(state, loss, tokens, acc_grad, acc_tokens, stops)
                    window.add(loss.item(), tokens.item(), numbers)
                cursor.batch_index += 1
            # Ranks act on the summed flag alone: a Ctrl-C that lands after this rank sent its flag
            # counts at the next step, on every rank at once.
            stopping = stops.item() > 0 or (world.size == 1 and stop.requested)
            cursor.trained_tokens += int(acc_tokens.item())
            cursor.step += 1
            window.steps += 1
            if memory_limit_gb and mx.get_peak_memory() > memory_limit_gb * memory.GB and splits < cfg.batch_size:
                splits = cursor.splits = min(cfg.batch_size, 2 * splits)
                on_log(f"Peak memory {mx.get_peak_memory() / memory.GB:.2f} GB passed the {memory_limit_gb:.2f} GB limit: "
                       f"{splits} micro-steps per batch from now on (same effective batch)")
                mx.reset_peak_memory()
            window.seconds += time.perf_counter() - tic
            on_step(cursor)
            last = cursor.step == total_steps
            val = None
            if valid_data and ((cfg.eval_every and cursor.step % cfg.eval_every == 0) or last):
                val = evaluate(model, valid_data, cfg.max_seq_length, cfg.val_batches, world)
            if cursor.step % cfg.report_every == 0 or last or val is not None:
                lr = float(optimizer.learning_rate.item())
                reduce = distributed.sum_values if world.size > 1 else None
                report = window.report(cursor, plan_size, lr, val, mx.get_peak_memory() / memory.GB, reduce)
                on_report(rundir.with_exact_match(report, exact_match if val is not None else None))
                window = Window()
            if (cfg.save_every and cursor.step % cfg.save_every == 0) or last:
                on_save(cursor)
            if stopping and not last:
                on_save(cursor)
                if world.size > 1:  # the others wait until rank 0 has saved: the launcher ends all at the first exit
                    distributed.sum_values([0.0])
                raise Interrupted(cursor.step)
    return cursor


@contextmanager
def checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each block's activations in the backward pass (less memory, more compute).

    MLX checkpoints functions, so the blocks' class `__call__` is wrapped for the duration.
    """
    if not enabled:
        yield
        return
    block_type = type(model.layers[0])
    original = block_type.__call__

    def call(block, *args, **kwargs):
        def inner(params, *args, **kwargs):
            block.update(params)
            return original(block, *args, **kwargs)

        return mx.checkpoint(inner)(block.trainable_parameters(), *args, **kwargs)

    block_type.__call__ = call
    try:
        yield
    finally:
        block_type.__call__ = original


def flat_trainable(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))
