"""The torch engine's step: the MLX engine's loss, accumulation, clipping, optimizer (`optim.py`)
and schedule, on the core's batch plan, as the `Trainer` the shell's one loop drives."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from returns.result import Failure, Result, Success

from finetune.core import batching
from finetune.core.config import TrainingConfig
from finetune.engines.protocol import SINGLE, Data, Step, World, batch_share
from finetune.engines.torch import budget, distributed
from finetune.engines.torch.lora import Lora
from finetune.engines.torch.loss import head_ce
from finetune.engines.torch.optim import Optimizer, clip_
from finetune.errors import UserError


def batch_tensors(data: Data, index: int, max_length: int, device: torch.device, world: World = SINGLE,
                  part: int = 0, parts: int = 1) -> tuple[batching.Batch, tuple[torch.Tensor, ...]]:
    """Micro-step `part` of `parts` of this rank's share of the plan's batch `index`, as numpy (for
    counts: the loop never asks the device for them) and tensors (for the step; pinned and
    copied without waiting on CUDA)."""
    b = batch_share(data, index, max_length, world.rank, world.size, part, parts)
    return b, tensors_of(b, device)


def tensors_of(b: batching.Batch, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A micro-batch's tensors on `device`, as `supervised_ce` takes them (pinned and copied
    without waiting on CUDA)."""
    arrays = [b.inputs.astype(np.int64), b.select.astype(np.int64), b.targets.astype(np.int64), b.weights]
    if b.positions is not None:
        arrays.append(b.positions.astype(np.int64))
    if device.type == "cuda":
        return tuple(torch.from_numpy(a).pin_memory().to(device, non_blocking=True) for a in arrays)
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


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


class Trainer:
    """The torch engine's side of the one loop (`protocol.Trainer`): the MLX engine's loss,
    accumulation, clipping, optimizer (`optim.py`) and schedule, step for step. Token counts come
    from the host's batches and the loss stays on the device until `loss()`: no sync per step."""

    def __init__(self, model: Lora, optimizer: Optimizer, cfg: TrainingConfig, device: torch.device,
                 world: World = SINGLE):
        self.model, self.optimizer, self.device, self.world = model, optimizer, device, world
        self._clip = cfg.grad_clip
        self._pending = torch.zeros((), device=device)  # Σ loss since the last `loss()`, on the device
        model.train()

    def seed(self, n: int) -> None:
        torch.manual_seed(n)

    def step(self, batches: Sequence[batching.Batch], stop: bool) -> Step:
        params = self.optimizer.params
        for p in params.values():
            p.grad = None
        tokens = 0.0
        for b in batches:
            loss, _ = supervised_ce(self.model, *tensors_of(b, self.device))
            loss.backward()
            tokens += float(b.weights.sum())
            self._pending += loss.detach()
        grads = {k: p.grad for k, p in params.items()}
        tokens, stopping = distributed.sum_grads(self.world, list(grads.values()), tokens, stop)
        torch._foreach_div_(list(grads.values()), max(tokens, 1.0))  # token-weighted mean
        if self._clip > 0:
            clip_(grads, self._clip)
        self.optimizer.update(grads)
        return Step(tokens=tokens, stopping=stopping)

    def loss(self) -> float:
        pending, self._pending = self._pending.item(), torch.zeros_like(self._pending)
        return pending

    def evaluate(self, data: Data, max_length: int, num_batches: int) -> float:
        return evaluate(self.model, data, max_length, num_batches, self.device, self.world)

    def learning_rate(self, step: int) -> float:
        return self.optimizer.learning_rate(step - 1)

    def peak_gb(self) -> float:
        return budget.peak_gb(self.device)

    def reset_peak(self) -> None:
        budget.reset_peak(self.device)

    def sum_values(self, values: list[float]) -> list[float]:
        return distributed.sum_values(self.world, values)

    def tensors(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return {k: v.numpy() for k, v in self.model.adapters().items()}, self.optimizer.state()

    def restore(self, params: Mapping[str, np.ndarray], opt: Mapping[str, np.ndarray], source: Path) -> Result[None, str]:
        live = self.model.trainable()
        for name, value in params.items():
            if name not in live or self.model.our_shape(name, live[name]) != tuple(value.shape):
                return Failure(f"{source}/adapters.safetensors: {name} does not fit this model")
        if set(live) != set(params):
            return Failure(f"{source}/adapters.safetensors: holds {len(params)} tensors, the model needs {len(live)}")
        self.model.load_adapters(params)
        self.optimizer.restore(opt)
        return Success(None)

    def broadcast(self) -> None:
        if self.world.size == 1:
            return
        opt = self.optimizer
        tensors = {f"param/{k}": p for k, p in opt.params.items()}
        tensors |= {f"m/{k}": t for k, t in opt.m.items()} | {f"v/{k}": t for k, t in opt.v.items()}
        distributed.broadcast_(self.world, tensors)
        opt.step = int(distributed.sum_values(self.world, [opt.step if self.world.rank == 0 else 0])[0])

    @contextmanager
    def running(self, run_dir: Path) -> Iterator[Callable[[], None]]:
        """torchrun's SIGTERM and a lost peer end the run with one line, not a trace."""
        try:
            yield lambda: None
        except distributed.Terminated as err:
            raise UserError(f"{err}; the last checkpoint in {run_dir} is intact: continue with --resume") from None
        except RuntimeError as err:  # a collective failed: name the lost rank
            lost = distributed.lost_peer(err, self.world, run_dir)
            if lost is None:
                raise
            raise lost from None
