"""aiomqtt calls that cannot swallow a cancellation.

aiomqtt waits for CONNACK, SUBACK and PUBACK with `asyncio.wait_for`. On Python 3.11, when the cancel
arrives in the same loop iteration as the broker's answer, `wait_for` returns the answer and drops the
cancel (CPython gh-86296, fixed in 3.12): the task goes on with `cancelling() > 0` and nothing to stop
it. A fast broker (Mosquitto with `set_tcp_nodelay`) makes that race common: a link cancelled right
after its announcement then ran on forever and its TaskGroup never finished. Awaiting through `call`
raises the dropped cancellation where it was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["call", "cancel_requests", "reraise_dropped_cancel"]

T = TypeVar("T")


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
