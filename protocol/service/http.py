"""Serving an ASGI app (FastAPI) on trio, beside a py-libp2p host in the same event loop.

Hypercorn's trio worker does the HTTP. We bind the socket ourselves and hand hypercorn its file
descriptor, so ``port=0`` works and the caller learns the real port before serving starts.
Shutdown is graceful and bounded: set the returned event, and open requests get
``graceful_timeout_s`` to finish.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

log = logging.getLogger(__name__)


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve_http(
    app: Any,
    sock: socket.socket,
    shutdown: trio.Event,
    graceful_timeout_s: float = 3.0,
) -> None:
    """Serve ``app`` on an already bound socket until ``shutdown`` is set."""
    config = Config()
    # hypercorn wraps the descriptor in a socket of its own and closes it: hand it over.
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = graceful_timeout_s
    config.accesslog = None
    config.errorlog = log
    await serve(app, config, shutdown_trigger=shutdown.wait)
