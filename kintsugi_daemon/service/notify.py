"""Notifications through Apprise URLs (e-mail, Slack, Teams, ntfy, a webhook ...): run finished, faulted,
suspended longer than a set time, fiducial lost.

The service calls `observe()` on every change of the controller; it only compares with what it saw
last and puts a notification on a bounded queue, so it never blocks the event loop. One worker task
delivers them, each on a daemon thread of its own (not the loop's default executor, which segmentation and
storage use; not a pool whose threads the interpreter joins at exit), bounded by `timeout_s`: a
notification service that is down or hangs costs the run nothing, and when the queue is full the oldest
notification is dropped, never the run's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from kintsugi_daemon.config import ConfigError, NotifySettings

__all__ = [
    "FIDUCIAL_LOST_ALERT",
    "Notification",
    "Notifier",
    "Observation",
    "apprise_sender",
]

log = structlog.get_logger("kintsugi.notify")

# The alert id the fiducial tracker will raise when it loses the fiducial (DOMAIN.md); notifications
# are wired to it now so that the tracker needs nothing more than `_raise_alert(FIDUCIAL_LOST_ALERT, ...)`.
FIDUCIAL_LOST_ALERT: Final = "fiducial_lost"

Kind = Literal["finished", "faulted", "suspended", "fiducial_lost"]
Level = Literal["success", "failure", "warning", "info"]


@dataclass(frozen=True)
class Observation:
    """What the notifier needs to know of the daemon after a change."""

    state: str  # state machine path, e.g. `running.mill`, `suspended`, `done`
    run_id: str | None
    alerts: Mapping[str, Mapping[str, Any]]
    slice: int | None = None  # slices completed
    total: int | None = None
    overlay: Path | None = None  # the latest overlay PNG on disk, for services that take attachments


@dataclass(frozen=True)
class Notification:
    kind: Kind
    title: str
    body: str
    level: Level
    attachment: Path | None = None
    created: float = field(default_factory=time.time)


# Delivers one notification; returns whether every service took it.
Sender = Callable[[Notification], bool]


def apprise_sender(urls: list[str], source: str = "notify.urls") -> Sender:
    """A sender over Apprise; every URL is checked now so a typo fails at start-up, naming the URL."""
    import apprise

    client = apprise.Apprise()
    for i, url in enumerate(urls):
        if not client.add(url):
            scheme = url.split("://", 1)[0] if "://" in url else url[:20]
            raise ConfigError(f"{source}[{i}]: Apprise does not understand this URL (scheme {scheme!r})")

    def send(n: Notification) -> bool:
        attach = None
        if n.attachment is not None and n.attachment.is_file():
            attach = apprise.AppriseAttachment(str(n.attachment))
        return bool(client.notify(body=n.body, title=n.title, notify_type=n.level, attach=attach))

    return send


class Notifier:
    """Edge detection over observations, a bounded queue and one delivery worker (`run()`)."""

    def __init__(
        self,
        settings: NotifySettings,
        instrument_id: str,
        *,
        sender: Sender | None = None,
    ) -> None:
        self.settings = settings
        self.instrument_id = instrument_id
        urls = settings.resolved_urls()
        self._send: Sender | None = sender or (apprise_sender(urls) if urls else None)
        self._queue: deque[Notification] = deque(maxlen=settings.queue)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued and nothing being delivered
        self._idle.set()
        self._last: Observation | None = None
        self._suspend_timer: asyncio.TimerHandle | None = None
        self.delivered: list[Notification] = []  # kept short: the last few, for status and tests
        self.failed = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self._send is not None

    @property
    def pending(self) -> int:
        """Notifications queued, not yet handed to a service."""
        return len(self._queue)

    @property
    def watching_suspension(self) -> bool:
        """A suspension is being timed (its notification is due unless the run resumes first)."""
        return self._suspend_timer is not None

    async def flush(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until everything queued was delivered or given up: a daemon that
        stops right after a run finishes still sends `finished`. Returns whether it all went."""
        if not self.enabled:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # -- deciding --------------------------------------------------------------------------------

    def observe(self, now: Observation) -> None:
        """Compare with the previous observation and queue what changed. Never blocks."""
        before, self._last = self._last, now
        if not self.enabled:
            return
        on = set(self.settings.on)
        was = before.state if before is not None else None
        top = now.state.split(".", 1)[0]
        if before is not None and top != (was or "").split(".", 1)[0]:
            if top == "done" and "finished" in on:
                self._put(self._finished(now))
            elif top == "faulted" and "faulted" in on:
                self._put(self._faulted(now))
        if top == "suspended" and (was or "").split(".", 1)[0] != "suspended":
            self._arm_suspended(now)
        elif top != "suspended":
            self._disarm_suspended()
        new_alert = FIDUCIAL_LOST_ALERT in now.alerts and (
            before is None or FIDUCIAL_LOST_ALERT not in before.alerts
        )
        if new_alert and "fiducial_lost" in on:
            message = str(now.alerts[FIDUCIAL_LOST_ALERT].get("message", "fiducial lost"))
            self._put(self._note("fiducial_lost", "fiducial lost", message, "warning", now))

    def _note(self, kind: Kind, what: str, body: str, level: Level, obs: Observation) -> Notification:
        attach = obs.overlay if self.settings.attach_overlay else None
        where = f"slice {obs.slice} of {obs.total}" if obs.total else ""
        run = f"run {obs.run_id}" if obs.run_id else "no run"
        text = f"{body}\n{self.instrument_id}: {run}{', ' + where if where else ''}."
        return Notification(kind, f"kintsugi {self.instrument_id}: {what}", text, level, attach)

    def _finished(self, obs: Observation) -> Notification:
        return self._note("finished", "run finished", "The run has finished.", "success", obs)

    def _faulted(self, obs: Observation) -> Notification:
        fault = obs.alerts.get("fault", {})
        message = str(fault.get("message", "see the daemon's log"))
        body = f"FAULT: {message}\nThe instrument was put in a safe state; the run waits for an operator."
        return self._note("faulted", "FAULTED", body, "failure", obs)

    def _arm_suspended(self, obs: Observation) -> None:
        if "suspended" not in self.settings.on:
            return
        self._disarm_suspended()
        delay = self.settings.suspended_after_s
        self._suspend_timer = asyncio.get_running_loop().call_later(delay, self._suspended_too_long)

    def _disarm_suspended(self) -> None:
        if self._suspend_timer is not None:
            self._suspend_timer.cancel()
            self._suspend_timer = None

    def _suspended_too_long(self) -> None:
        self._suspend_timer = None
        now = self._last
        if now is None or now.state.split(".", 1)[0] != "suspended":
            return
        reasons = "; ".join(str(a.get("message")) for a in now.alerts.values()) or "no active alert"
        minutes = self.settings.suspended_after_s / 60
        body = f"Suspended for more than {minutes:.0f} min: {reasons}"
        self._put(self._note("suspended", "suspended", body, "warning", now))

    def _put(self, note: Notification) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("notification dropped: queue full", dropped=self._queue[0].kind)
        self._queue.append(note)  # a full deque drops its oldest
        self._idle.clear()
        self._wake.set()

    # -- delivering ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver queued notifications one at a time until cancelled."""
        if not self.enabled:
            return
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await self._deliver(self._queue.popleft())
                self._idle.set()
        finally:
            self._disarm_suspended()

    def _in_thread(self, note: Notification) -> asyncio.Future[bool]:
        """Run the sender on a daemon thread: one that hangs is abandoned, and never holds up exit."""
        assert self._send is not None
        send, loop = self._send, asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()

        def settle(ok: bool | None, exc: BaseException | None) -> None:
            if future.done():
                return  # timed out meanwhile
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(bool(ok))

        def work() -> None:
            ok: bool | None = None
            error: BaseException | None = None
            try:
                ok = send(note)
            except Exception as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle, ok, error)

        threading.Thread(target=work, name=f"kintsugi-notify-{note.kind}", daemon=True).start()
        return future

    async def _deliver(self, note: Notification) -> None:
        started = time.monotonic()
        ok = False
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                ok = await self._in_thread(note)
        except TimeoutError:
            log.warning("notification timed out", kind=note.kind, timeout_s=self.settings.timeout_s)
        except Exception as exc:  # a notifier's failure is logged, never the run's problem
            log.warning("notification failed", kind=note.kind, error=f"{type(exc).__name__}: {exc}")
        took = round(time.monotonic() - started, 3)
        if ok:
            self.delivered.append(note)
            del self.delivered[:-20]
            log.info("notification sent", kind=note.kind, took_s=took)
        else:
            self.failed += 1
            log.warning("notification not delivered", kind=note.kind, took_s=took)

    def close(self) -> None:
        self._disarm_suspended()
