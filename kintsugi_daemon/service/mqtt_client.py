"""How this project's aiomqtt clients behave: sockets without Nagle's delay, calls that cannot swallow a
cancellation.

Nagle: paho leaves it on, so a small publish waits for the ACK of the previous segment, which the
broker's kernel delays up to 40 ms when it has nothing to send back at once. Commands, replies and
events are small and one at a time: with Mosquitto's `set_tcp_nodelay` on, the command fuzz drill's
replies (500-command runs) fell from 176 to 31 per second, one 40 ms stall each, until the clients set
TCP_NODELAY too.

Cancellation:
aiomqtt waits for CONNACK, SUBACK and PUBACK with `asyncio.wait_for`. On Python 3.11, when the cancel
arrives in the same loop iteration as the broker's answer, `wait_for` returns the answer and drops the
cancel (CPython gh-86296, fixed in 3.12): the task goes on with `cancelling() > 0` and nothing to stop
it. A fast broker (Mosquitto with `set_tcp_nodelay`) makes that race common: a link cancelled right
after its announcement then ran on forever and its TaskGroup never finished. Awaiting through `call`
raises the dropped cancellation where it was lost.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import TypeVar

from aiomqtt.types import SocketOption

__all__ = ["NO_DELAY", "call", "cancel_requests", "reraise_dropped_cancel"]

T = TypeVar("T")

# `socket_options` for every aiomqtt.Client of the daemon and its tools.
NO_DELAY: tuple[SocketOption, ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def cancel_requests() -> int:
    """How many cancellations of the current task are pending (0 outside a task)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def reraise_dropped_cancel(before: int) -> None:
    """Raise CancelledError if the task was cancelled since `cancel_requests()` returned `before` and
    the cancel never arrived as an exception (it would have left this frame if it had)."""
    if cancel_requests() > before:
        raise asyncio.CancelledError("cancelled during an MQTT call that completed at the same moment")


async def call(operation: Awaitable[T]) -> T:
    """Await an aiomqtt operation; a cancellation it dropped is raised here."""
    before = cancel_requests()
    result = await operation
    reraise_dropped_cancel(before)
    return result
