"""Helpers for tests that start ranks through a launcher (mlx.launch, torchrun) as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end(proc: subprocess.Popen) -> None:
    """Kill the launcher and every rank (each test starts them in a session of their own)."""
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end_at = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {path} appeared:\n{log.read_text()}"
        assert time.monotonic() < end_at, f"{path} did not appear in {timeout}s:\n{log.read_text()}"
        time.sleep(0.01)


def rank_pid(launcher: int, rank: int, variable: str) -> int:
    """The pid of the launcher's child that runs `rank`, found by its `variable` (MLX_RANK, RANK)."""
    for child in Path(f"/proc/{launcher}/task").glob("*/children"):
        for pid in child.read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"{variable}={rank}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no rank {rank} ({variable}) under launcher {launcher}")
