"""A watchdog for collectives that never return: a small child process that ends this rank when it
stops hearing from it.

A rank waiting in `mx.distributed.init` for a host that never joins, or in an all-reduce for a
peer that hangs with its connection open (SIGSTOP, a stuck GPU, a wedged host), blocks inside C++
holding the GIL: no Python thread or signal handler of the rank itself runs again. So the watch
is kept from outside: the child waits on a pipe; the rank writes a line after each step (its new
allowance); when nothing arrives in time the child prints one line naming what was awaited and
kills the rank. When the rank ends, for any reason, the pipe closes and the child exits quietly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

# The child's whole program (`python -S -c`, so it starts in ~20 ms without site-packages).
CHILD = r"""
import os, select, signal, sys
pid, allowance, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
buf = b""
while True:
    ready, _, _ = select.select([0], [], [], allowance)
    if not ready:
        sys.stderr.write("ft: error: " + message.replace("{seconds}", "%.0f" % allowance) + "\n")
        sys.stderr.flush()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        sys.exit(0)
    data = os.read(0, 4096)
    if not data:
        sys.exit(0)
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line.startswith(b"m "):
            message = line[2:].decode()
        elif line.strip():
            allowance = float(line)
"""


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from `$name`, else `default` (a bad value is ignored loudly)."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        print(f"warning: ${name}={raw!r} is not a positive number of seconds; using {default:g}", file=sys.stderr)
        return default
    return value


class Watchdog:
    """`pet()` at least every `allowance` seconds, or the process is killed after one line on stderr.

    `message` may hold `{seconds}` (the allowance that ran out). Use as a context manager.
    """

    def __init__(self, allowance: float, message: str):
        read, self._write = os.pipe()
        self.allowance = allowance
        self._last = time.monotonic()
        self._longest = 0.0
        self._child = subprocess.Popen(
            [sys.executable, "-S", "-c", CHILD, str(os.getpid()), repr(allowance), message],
            stdin=read, stdout=subprocess.DEVNULL, close_fds=True,
        )
        os.close(read)

    def pet(self, floor: float | None = None) -> None:
        """Alive; the next allowance is `floor` (default: the first one) or 10x the longest gap seen."""
        now = time.monotonic()
        self._longest = max(self._longest, now - self._last)
        self._last = now
        allowance = max(floor or self.allowance, 10 * self._longest)
        self._send(f"{allowance}\n")

    def say(self, message: str) -> None:
        """What to print from now on, when the allowance runs out."""
        self._send("m " + message.replace("\n", " ") + "\n")

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):  # the child is gone (killed with the process group)
            os.write(self._write, line.encode())

    def close(self) -> None:
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
            self._child.wait()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
