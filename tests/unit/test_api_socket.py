"""The instrument API's listening socket: connections it accepts send small answers at once.

Without TCP_NODELAY a keep-alive answer's body waited for the client's delayed ACK, about 40 ms a call on
Linux: 48 ms for `identity` instead of 1 ms, most of the instrument's idle time between verbs
(benchmarks/bench_idle.py). The guard here is the socket option itself, on the accepted side.
"""

from __future__ import annotations

import socket

from kintsugi_daemon.drivers.server import listen_socket


def test_accepted_connections_do_not_wait_for_delayed_acks() -> None:
    server = listen_socket("127.0.0.1", 0)
    client = socket.create_connection(server.getsockname()[:2], timeout=5)
    try:
        accepted, _ = server.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
        server.close()
