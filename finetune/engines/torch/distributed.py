"""Data parallel over `torch.distributed` as torchrun starts it: the world, sums, agreement, lost peers.

gloo on CPUs, NCCL on CUDA, nothing of our own on the wire. The contract is the MLX engine's
(`shell/training/distributed.py`): the batch plan is global, each rank trains on its share,
gradients and token counts are summed across ranks and divided once, rank 0 alone writes and prints.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from finetune.engines.protocol import SINGLE, World
from finetune.errors import UserError

# How long a collective waits for a rank that stays silent (stopped, wedged). A rank that dies
# closes its sockets, and its peers fail at once; this bounds the silent case. FT_DIST_TIMEOUT overrides.
TIMEOUT_S = 300.0


def launched() -> bool:
    """torchrun started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


class Terminated(UserError):
    """torchrun stopped this rank: another rank failed, or the job was stopped."""


_joined: list[World] = []  # the group this process joined (a process joins once)


def current() -> World:
    """The world `setup` joined (one process before that)."""
    return _joined[0] if _joined else SINGLE


def setup(device_type: str = "cpu") -> World:
    """Join torchrun's group (one process when not launched); ranks above 0 print nothing.

    NCCL when the engine computes on CUDA (one GPU per local rank), gloo otherwise.
    Errors still reach stderr from every rank.
    """
    if _joined or not launched():
        return current()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":  # NCCL refuses two ranks on one GPU: one GPU per local rank
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise UserError(f"rank {os.environ.get('RANK', local)}: local rank {local} but {gpus} CUDA GPU(s) here; "
                            f"start at most --nproc-per-node {gpus} (one GPU per rank), or train on CPUs with --device cpu")
        torch.cuda.set_device(local)
    try:
        timeout = timedelta(seconds=float(os.environ.get("FT_DIST_TIMEOUT", TIMEOUT_S)))
    except ValueError:
        raise UserError(f"FT_DIST_TIMEOUT={os.environ['FT_DIST_TIMEOUT']!r}: give seconds, e.g. 300") from None
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"rank {os.environ.get('RANK', '?')}: could not join torchrun's group over {backend}: "
                        f"{str(err).splitlines()[0]}") from None
    atexit.register(_leave)
    world = World(dist.get_rank(), dist.get_world_size(), backend)
    _joined.append(world)
    # torchrun ends the other ranks with SIGTERM when one fails: one line and the temporary
    # files removed (atomic writes clean up on an exception), instead of a silent death.
    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
        signal.signal(signal.SIGTERM, lambda signum, frame: _terminated(world))
        atexit.register(_exiting)  # registered last, so it runs first at exit
    if world.rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return world


LEAVE_S = 10  # how long a finishing rank waits for its peers at exit


def _terminated(world: World) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated(f"rank {world.rank}: stopped by torchrun (another rank failed or the job was stopped; "
                     "torchrun's summary names the rank)")


def _exiting() -> None:
    """At exit the rank has said what it had to: a SIGTERM now (torchrun ending the job while this
    rank leaves the group or runs torch's own exit hooks) is ignored rather than raised inside an
    exit hook, which would print a traceback; the process ends with its own code."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _leave() -> None:
    """Leave the group together: a rank tearing gloo down while a peer still talks to it can
    abort in C++ ("terminate called without an active exception") instead of exiting with its code."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(Exception):  # a peer already gone: leave anyway, after LEAVE_S at most
            dist.monitored_barrier(timeout=timedelta(seconds=LEAVE_S))
    dist.destroy_process_group()


def _wire(world: World) -> torch.device:
    """Where collectives take their tensors: the GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda") if world.backend == "nccl" else torch.device("cpu")


def sum_grads(world: World, grads: list[torch.Tensor], tokens: float, stop: bool) -> tuple[float, bool]:
    """Sum `grads` (in place), the supervised-token count and the stop flags over all ranks, in
    one all_reduce: (all ranks' tokens, whether any rank was asked to stop).

    float32 on the wire; the count rides along exactly (integers below 2**24 per step). Every
    rank sees the same stop flag at the same step, so all stop there and rank 0 saves.
    """
    if world.size == 1:
        return tokens, stop
    wire = _wire(world)
    flat = torch.cat([g.detach().reshape(-1).to(wire, torch.float32) for g in grads]
                     + [torch.tensor([tokens, float(stop)], dtype=torch.float32, device=wire)])
    dist.all_reduce(flat)
    at = 0
    for g in grads:
        g.copy_(flat[at: at + g.numel()].view_as(g))
        at += g.numel()
    return float(flat[-2]), bool(flat[-1] > 0)


def sum_values(world: World, values: list[float]) -> list[float]:
    """Sum a few Python numbers (loss sums, token counts) over all ranks, in float64."""
    if world.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_wire(world))
    dist.all_reduce(t)
    return [float(v) for v in t.cpu().tolist()]


def broadcast_(world: World, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0's values of `tensors` on every rank, in place, in sorted-name order (the same
    collectives in the same order on every rank, whatever order each built its dict in)."""
    if world.size == 1:
        return
    wire = _wire(world)
    for name in sorted(tensors):
        t = tensors[name]
        moved = t.detach().to(wire)
        dist.broadcast(moved, src=0)
        with torch.no_grad():
            t.copy_(moved)




# What gloo and NCCL say when a peer's sockets close or a collective runs out of time.
_LOST = ("connection", "peer", "broken pipe", "timed out", "timeout", "nccl communicator was aborted")


def lost_peer(err: RuntimeError, world: World, run_dir: Path) -> UserError | None:
    """A one-line error when a collective failed because another rank died or went silent."""
    text = str(err).lower()
    if world.size == 1 or not any(word in text for word in _LOST):
        return None
    others = [r for r in range(world.size) if r != world.rank]
    peers = f"rank {others[0]}" if len(others) == 1 else "another rank (torchrun's summary names it)"
    how = "went silent past the timeout" if "time" in text else "died or was stopped"
    return UserError(
        f"rank {world.rank}: lost {peers} ({how}); the last checkpoint in {run_dir} is intact: "
        "continue with --resume (any number of ranks)"
    )
