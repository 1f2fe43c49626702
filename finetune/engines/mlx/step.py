"""The MLX engine's step: the loss, one compiled function per micro-step, and the `Trainer` the
shell's one loop drives (`shell/training/loop.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from returns.result import Failure, Result, Success

from finetune.core import batching, memory, memplan
from finetune.core.config import TrainingConfig
from finetune.engines.mlx import budget, distributed
from finetune.engines.mlx.loss import head_ce
from finetune.engines.protocol import Data, Step, World, batch_share


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
    the torch engine's `engines/torch/step.supervised_ce` is the same definition).

    The LM head runs only where a target is supervised: `select` holds flat indices into
    `inputs` (B*T), `targets` the next tokens there, `weights` 1 (0 for the padding of
    `select` itself). Padding tokens of `inputs` are never targets. The head and the loss run
    over chunks of those positions (`loss.head_ce`); `grad=False` (evaluation) skips its gradient.
    """
    h = model.hidden(inputs, segments, positions)  # (B, T, D)
    h = h.reshape(-1, h.shape[-1])[select]  # (N, D)
    return head_ce(model.head, h, targets, weights, grad=grad), weights.sum()


def arrays_of(b: batching.Batch) -> tuple[mx.array, ...]:
    """A micro-batch's arrays, as `supervised_ce` takes them."""
    arrays = (b.inputs, b.select, b.targets, b.weights)
    if b.segments is not None:
        arrays += (b.segments, b.positions)
    return tuple(mx.array(a) for a in arrays)


def batch_arrays(
    data: Data, index: int, max_length: int, rank: int = 0, ranks: int = 1, part: int = 0, parts: int = 1
) -> tuple[batching.Batch, tuple[mx.array, ...]]:
    """Micro-step `part` of `parts` of rank `rank`'s share of the plan's batch `index`
    (`protocol.batch_share`), as numpy (for counts) and MLX arrays."""
    b = batch_share(data, index, max_length, rank, ranks, part, parts)
    return b, arrays_of(b)


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


class Trainer:
    """The MLX engine's side of the one loop (`protocol.Trainer`): the model, its optimizer, and
    one compiled function per micro-step (gradient, accumulation, and on the last micro-step
    the sum over ranks, clipping and update) with explicit state, one `mx.eval` per micro-batch.
    The gradients and token counts are summed across ranks inside the compiled step, before the
    one division."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, cfg: TrainingConfig,
                 world: World = distributed.SINGLE, planned: memplan.MemoryPlan | None = None):
        self.model, self.optimizer, self.world = model, optimizer, world
        self._checkpointing = cfg.grad_checkpoint or bool(planned and planned.grad_checkpoint)
        self._planned = planned
        self._pending = 0.0  # Σ loss since the last `loss()`: a Python float (MLX syncs per micro-batch)
        self._clip = cfg.grad_clip
        self._step: Callable | None = None  # compiled at the first step: a restore replaces the state
        model.train()

    def _compiled(self) -> Callable:
        """The compiled micro-step over the model's, the optimizer's and the generator's state."""
        model, optimizer, world, clip = self.model, self.optimizer, self.world, self._clip
        self._state = state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, supervised_ce)

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

        return step

    def seed(self, n: int) -> None:
        mx.random.seed(n)

    def step(self, batches: Sequence[batching.Batch], stop: bool) -> Step:
        if self._step is None:
            self._step = self._compiled()
        acc_grad = acc_tokens = stops = None
        for i, b in enumerate(batches):
            loss, tokens, acc_grad, acc_tokens, stops = self._step(
                arrays_of(b), acc_grad, acc_tokens, i == len(batches) - 1, mx.array(float(stop)))
            mx.eval(self._state, loss, tokens, acc_grad, acc_tokens, stops)
            self._pending += loss.item()
        return Step(tokens=acc_tokens.item(), stopping=stops.item() > 0)

    def loss(self) -> float:
        pending, self._pending = self._pending, 0.0
        return pending

    def evaluate(self, data: Data, max_length: int, num_batches: int) -> float:
        return evaluate(self.model, data, max_length, num_batches, self.world)

    def learning_rate(self, step: int) -> float:
        return float(self.optimizer.learning_rate.item())

    def peak_gb(self) -> float:
        return mx.get_peak_memory() / memory.GB

    def reset_peak(self) -> None:
        mx.reset_peak_memory()

    def sum_values(self, values: list[float]) -> list[float]:
        return distributed.sum_values(values) if self.world.size > 1 else list(values)

    def tensors(self) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        return flat_trainable(self.model), dict(tree_flatten(self.optimizer.state))

    def restore(self, params: Mapping[str, mx.array], opt: Mapping[str, mx.array], source: Path) -> Result[None, str]:
        current = flat_trainable(self.model)
        for name, value in params.items():
            if name not in current or current[name].shape != value.shape:
                return Failure(f"{source}/adapters.safetensors: {name} does not fit this model")
        if set(current) != set(params):
            return Failure(f"{source}/adapters.safetensors: holds {len(params)} tensors, the model needs {len(current)}")
        self.model.load_weights(list(params.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(opt.items()))
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._step = None  # recompiled over the restored state
        return Success(None)

    def broadcast(self) -> None:
        if self.world.size > 1:
            self.model.update(distributed.broadcast(self.model.trainable_parameters(), self.world))
            self.optimizer.state = distributed.broadcast(self.optimizer.state, self.world)
            self._step = None  # recompiled over the broadcast state

    @contextmanager
    def running(self, run_dir: Path) -> Iterator[Callable[[], None]]:
        """Activation checkpointing, MLX's memory limit and the ranks' watchdog; a failed
        collective names the lost rank instead of a trace."""
        try:
            with ExitStack() as stack:
                stack.enter_context(checkpointed(self.model, self._checkpointing))
                stack.enter_context(budget.enforced(self._planned.limit_gb) if self._planned else nullcontext())
                yield stack.enter_context(distributed.watched(self.world, run_dir))
        except RuntimeError as err:
            lost = distributed.lost_peer(err, self.world, run_dir)
            if lost is None:
                raise
            raise lost from None


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
