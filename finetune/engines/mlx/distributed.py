"""Data parallel over `mx.distributed`: the world, sums across ranks, agreement, lost peers.

Ranks come from MLX's own launcher (`mlx.launch`: ring, MPI, JACCL, NCCL). The batch plan is
global; each rank trains on its share of every batch, gradients and token counts are summed
across ranks and divided once, and rank 0 alone writes and prints.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from finetune.engines import watchdog
from finetune.engines.protocol import SINGLE, World, describe_world
from finetune.errors import UserError

describe = describe_world


@cache
def setup() -> World:
    """Join the launcher's group (one process when not launched); ranks above 0 print nothing.

    Errors still reach stderr from every rank, so a failure on one host is never hidden.
    """
    with _joining():
        group = mx.distributed.init()
    if group.size() == 1:
        return SINGLE
    world = World(group.rank(), group.size(), _backend())
    if world.rank > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return world


@contextmanager
def _joining() -> Iterator[None]:
    """While the ranks connect: a host that never joins ends this rank with one line naming it.

    (`mx.distributed.init` waits for every peer inside C++; only a watchdog outside can speak.)
    """
    awaited = _awaited()
    if not awaited:
        yield
        return
    rank = os.environ.get("MLX_RANK", "?")
    seconds = watchdog.seconds_from_env("FT_CONNECT_TIMEOUT", 120.0)
    message = (f"rank {rank}: {awaited} did not join within {{seconds}} s; check that every host in the hostfile "
               "is reachable at its address from the others and runs this ft (FT_CONNECT_TIMEOUT sets the wait)")
    with watchdog.Watchdog(seconds, message):
        yield


@contextmanager
def watched(world: World, run_dir: Any) -> Iterator[Callable[[], None]]:
    """Training under a watchdog (ranks only): call the yielded function after every step.

    A peer that hangs with its connection open blocks the all-reduce forever; after
    `$FT_PEER_TIMEOUT` s (default 300), or 10x the longest step so far, this rank ends with one line.
    """
    if world.size == 1:
        yield lambda: None
        return
    seconds = watchdog.seconds_from_env("FT_PEER_TIMEOUT", 300.0)
    message = (f"rank {world.rank}: no step finished for {{seconds}} s: another rank hung or its host went away "
               f"(FT_PEER_TIMEOUT sets the wait); the last checkpoint in {run_dir} is intact: continue with --resume")
    with watchdog.Watchdog(seconds, message) as dog:
        yield dog.pet


def _awaited() -> str:
    """The peers `mx.distributed.init` is about to wait for, in words ("" when not launched)."""
    path = os.environ.get("MLX_HOSTFILE", "")
    if path:  # the ring: a JSON list, per rank, of "ip:port" addresses
        try:
            hosts = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return "the other ranks"
        mine = os.environ.get("MLX_RANK", "")
        peers = [f"rank {r} at {', '.join(map(str, a)) if isinstance(a, list) else a}"
                 for r, a in enumerate(hosts) if str(r) != mine]
        return "; ".join(peers) or "the other ranks"
    if "MLX_JACCL_COORDINATOR" in os.environ:
        return f"the ranks of coordinator {os.environ['MLX_JACCL_COORDINATOR']}"
    return ""


def _backend() -> str:
    """Which backend `mx.distributed.init()` found, from the environment its launchers set."""
    env = os.environ
    if "MLX_IBV_DEVICES" in env or "MLX_JACCL_COORDINATOR" in env:
        return "jaccl"
    if "NCCL_HOST_IP" in env:
        return "nccl"
    if "MLX_HOSTFILE" in env:
        return "ring"
    if any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MLX_MPI_LIBNAME")):
        return "mpi"
    return "unknown"


def sum_tree(tree: Any) -> Any:
    """Sum every array of `tree` over all ranks in one all_sum (float32 on the wire)."""
    flat = tree_flatten(tree)
    sizes = [v.size for _, v in flat]
    joined = mx.distributed.all_sum(mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat]))
    offsets = [sum(sizes[:i]) for i in range(1, len(sizes))]
    parts = mx.split(joined, offsets) if offsets else [joined]
    return tree_unflatten([(k, p.reshape(v.shape).astype(v.dtype)) for (k, v), p in zip(flat, parts, strict=True)])


def sum_values(values: list[float]) -> list[float]:
    """Sum a few Python numbers (token counts, loss sums) over all ranks, in float64 on the CPU."""
    summed = mx.distributed.all_sum(mx.array(values, dtype=mx.float64), stream=mx.cpu)
    return [float(v) for v in summed.tolist()]


def broadcast(tree: Any, world: World) -> Any:
    """Rank 0's values of `tree` on every rank (the others contribute zeros to a sum).

    Leaves go in sorted-name order, one collective per eval, float32 on the wire: a restored
    tree and a fresh one may order their keys (and type their counters) differently, and two
    ranks must issue the same collectives in the same order or the ring waits forever.
    """
    if world.size == 1:
        return tree
    out = []
    for name, v in sorted(tree_flatten(tree), key=lambda kv: kv[0]):
        if isinstance(v, mx.array):
            mine = v.astype(mx.float32) if world.rank == 0 else mx.zeros(v.shape, mx.float32)
            v = mx.distributed.all_sum(mine, stream=mx.cpu).astype(v.dtype)
            mx.eval(v)
        out.append((name, v))
    return tree_unflatten(out)





def lost_peer(err: RuntimeError, world: World, run_dir: Any) -> UserError | None:
    """A one-line error when a collective failed because another rank died; None otherwise."""
    if world.size == 1 or "peer" not in str(err) and "connection" not in str(err):
        return None
    left, right = (world.rank - 1) % world.size, (world.rank + 1) % world.size
    peers = f"rank {left}" if left == right else f"rank {left} or rank {right}"
    return UserError(
        f"rank {world.rank}: lost the connection to {peers} (it died or was stopped); "
        f"the last checkpoint in {run_dir} is intact: continue with --resume (any number of ranks)"
    )
