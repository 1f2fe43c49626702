"""Run the application under uvicorn on a socket bound here (so a busy port is a one-line error)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from finetune.errors import UserError
from finetune.shell.serve.app import Served, build

GRACE_S = 5  # seconds a Ctrl-C waits for open requests before closing them


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a UserError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot resolve ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen ({err.strerror}); "
                        "choose another --port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def run(served: Served, sock: socket.socket, api_key: str | None, verbose: bool, lines: Sequence[str]) -> None:
    """Serve until Ctrl-C (or SIGTERM); `lines` are printed once the socket listens."""
    import uvicorn

    config = uvicorn.Config(build(served, api_key), log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=GRACE_S, lifespan="off")
    server = uvicorn.Server(config)
    for line in lines:
        print(line, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        served.worker.stop()
        sock.close()
