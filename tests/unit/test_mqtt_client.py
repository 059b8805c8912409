"""A cancel that lands in the same loop iteration as the broker's answer is not lost (mqtt_client).

aiomqtt waits with `asyncio.wait_for`; `answered_at_once` reproduces that wait and makes the answer and
the cancel arrive together, deterministically, which a fast broker does by chance.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from kintsugi_daemon.service import mqtt_client


async def answered_at_once(wrap: Callable[[Awaitable[str]], Awaitable[str]]) -> asyncio.Task[str]:
    """A task awaiting a wait_for (as aiomqtt's publish does) whose answer and cancel come together.
    The task goes on to wait for an event nobody sets: a dropped cancel leaves it waiting."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    never = asyncio.Event()

    async def caller() -> str:
        await wrap(asyncio.wait_for(answer, timeout=10))
        await never.wait()
        return "went on"

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    answer.set_result("PUBACK")  # wakes wait_for on the next iteration...
    task.cancel()  # ...in which the cancel arrives too
    return task


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for drops the cancel only on Python 3.11")
async def test_plain_wait_for_drops_the_cancel_on_python_311() -> None:
    """The hazard itself: without `call`, the cancelled task keeps running."""
    task = await answered_at_once(lambda aw: aw)
    done, _ = await asyncio.wait([task], timeout=0.5)
    assert not done and task.cancelling() == 1
    task.cancel()  # a second cancel finds it waiting on the event, and is delivered
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_call_raises_the_dropped_cancel() -> None:
    task = await answered_at_once(mqtt_client.call)
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled()


async def test_call_returns_the_answer_when_not_cancelled() -> None:
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    answer.set_result(7)
    assert await mqtt_client.call(asyncio.wait_for(answer, timeout=1)) == 7


async def test_call_inside_a_cancel_handler_goes_on() -> None:
    """Cleanup after a delivered cancel (the link's `offline`) must still be able to publish."""
    published: list[str] = []

    async def link() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            answer.set_result("offline")
            published.append(await mqtt_client.call(asyncio.wait_for(answer, timeout=1)))
            raise

    task = asyncio.create_task(link())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert published == ["offline"]


async def test_a_timeout_that_fires_during_the_call_stays_a_timeout() -> None:
    """asyncio.timeout cancels the task; a dropped timeout-cancel raised by `call` becomes TimeoutError."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def caller() -> None:
        async with asyncio.timeout(0.05):
            await mqtt_client.call(asyncio.wait_for(answer, timeout=10))
            await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    loop.call_later(0.05, answer.set_result, "late PUBACK")  # lands with the timeout's cancel
    task = asyncio.create_task(caller())
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and isinstance(task.exception(), TimeoutError)
