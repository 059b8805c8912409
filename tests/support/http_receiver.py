"""Loopback HTTP endpoints for notification tests: a receiver that records every JSON body POSTed to it
(what Apprise's json:// sends), and a black hole that accepts connections and never answers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Receiver", "black_hole", "receiver"]


class Receiver:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"json://{host!s}:{port}/hook"

    def record(self, body: dict[str, Any]) -> None:
        with self._arrived:
            self.bodies.append(body)
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Until `count` bodies have arrived (raises TimeoutError otherwise)."""

        def wait() -> bool:
            with self._arrived:
                return self._arrived.wait_for(lambda: len(self.bodies) >= count, timeout_s)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"{len(self.bodies)} of {count} notifications arrived in {timeout_s} s")
        return list(self.bodies)


@contextmanager
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            holder[0].record(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, name="receiver", daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def black_hole() -> Iterator[str]:
    """A json:// URL whose server accepts the TCP connection (the kernel's backlog) and never replies."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"json://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()
