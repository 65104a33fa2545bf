"""Several worker processes, each with its own listening socket on the same port (SO_REUSEPORT).

uvicorn's multi-worker mode binds one socket in the parent and shares it: every worker waits on
the same accept queue, and the one that is already awake takes the next connection. A client with
a few keep-alive connections then lands them all on one worker while the others idle (measured:
one HTTPS client with 8 connections got 9.1k requests/s from 2 workers, the same as from one).
With ``SO_REUSEPORT`` each worker listens on a socket of its own and the kernel spreads new
connections across them by a hash of their addresses, so a few connections already use every
worker.

uvicorn keeps its supervisor (health checks, restarts, signal handling); the only hand-written
part is how a worker gets its socket. uvicorn hands each new worker the parent's sockets by
pickling them into the spawned process, so the parent hands over a ``PerWorkerSocket`` instead,
which unpickles in the worker as a fresh socket bound with ``SO_REUSEPORT``. The parent binds
(without listening) to the same address first: that fails early if the port is taken, learns a
port chosen by the system (port 0), and keeps the port from other users while workers restart.
Only processes of the same user can join a ``SO_REUSEPORT`` group on Linux.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["PerWorkerSocket", "bind_per_worker", "reserve_port"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_per_worker(host: str, port: int) -> socket.socket:
    """A new socket bound to ``(host, port)`` with ``SO_REUSEPORT``, ready to listen."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) in the parent; returns the socket and the port it holds."""
    sock = bind_per_worker(host, port)
    return sock, int(sock.getsockname()[1])


class PerWorkerSocket:
    """Stands for a listening socket in the parent; becomes a socket of its own in each worker."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        # Called when uvicorn pickles the worker's arguments; unpickling in the worker binds.
        return bind_per_worker, (self.host, self.port)
