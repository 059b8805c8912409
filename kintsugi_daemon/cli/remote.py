"""The operator's side of MQTT: send a command and wait for its reply; read or watch the daemon's state.

`kintsugi start|pause|resume|stop|abort|status|watch` use this; so do the demo and the tests, so the
commands a person types are the ones the tests exercise.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.service.messages import SLICES_LATEST_PREVIEW, Topics

__all__ = ["DaemonView", "Operator"]

REPLY_TIMEOUT_S = 15.0


@dataclass
class DaemonView:
    """What a subscriber knows of the daemon: the retained topics plus the latest events."""

    status: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    description: dict[str, Any] | None = None
    latest_slice: dict[str, Any] | None = None
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def apply(self, topics: Topics, topic: str, payload: bytes) -> None:
        suffix = topics.suffix(topic)
        if suffix is None or suffix == SLICES_LATEST_PREVIEW:
            return  # the preview is a PNG, not JSON
        data = json.loads(payload) if payload else None
        if suffix == "status":
            self.status = data
        elif suffix == "progress":
            self.progress = data
        elif suffix == "description":
            self.description = data
        elif suffix == "slices/latest":
            self.latest_slice = data
        elif suffix == "metrics":
            self.metrics = data or {}
        elif suffix.startswith("alerts/"):
            alert_id = suffix.removeprefix("alerts/")
            if data:
                self.alerts[alert_id] = data
            else:
                self.alerts.pop(alert_id, None)
        elif suffix.startswith("events/") and data:
            self.events.append(data)
            del self.events[:-50]

    def render(self) -> str:
        s = self.status or {}
        p = self.progress or {}
        lines = [f"daemon   {s.get('state', '?')}  {s.get('path') or ''}  {s.get('reason') or ''}".rstrip()]
        if p.get("run_id"):
            eta = p.get("eta_s")
            eta_text = f"{eta / 60:.1f} min" if isinstance(eta, int | float) else "?"
            lines.append(
                f"run      {p['run_id']}  slice {p.get('slice')}/{p.get('total')}  "
                f"step {p.get('step') or '-'}  {p.get('percent', 0):.1f} %  ETA {eta_text}"
            )
        if self.metrics:
            lines.append("metrics  " + "  ".join(f"{k}={v}" for k, v in list(self.metrics.items())[:8]))
        for alert in self.alerts.values():
            lines.append(f"ALERT    [{alert.get('severity')}] {alert.get('id')}: {alert.get('message')}")
        for event in self.events[-5:]:
            lines.append(
                f"event    #{event.get('seq')} {event.get('type', '').removeprefix('kintsugi.')} "
                f"{json.dumps(event.get('data', {}))[:90]}"
            )
        return "\n".join(lines)


class Operator:
    def __init__(self, settings: MqttSettings, instrument_id: str) -> None:
        self.settings = settings
        self.topics = Topics(instrument_id)

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[aiomqtt.Client]:
        s = self.settings
        tls = aiomqtt.TLSParameters(ca_certs=str(s.ca_file) if s.ca_file else None) if s.tls else None
        async with aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.resolved_password(),
            identifier=f"kintsugi-cli-{uuid.uuid4().hex[:8]}",
            tls_params=tls,
            timeout=10,
        ) as client:
            yield client

    async def command(
        self, verb: str, fields: dict[str, Any] | None = None, timeout_s: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """Publish `cmd/<verb>` and return its reply (raises TimeoutError when none comes)."""
        payload = {"command_id": uuid.uuid4().hex, "sent_at": time.time(), **(fields or {})}
        async with self._client() as client:
            await client.subscribe(self.topics.reply(verb), qos=1)
            await client.publish(self.topics.command(verb), json.dumps(payload), qos=1)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    reply: dict[str, Any] = json.loads(message.payload)
                    if reply.get("command_id") == payload["command_id"]:
                        return reply
        raise TimeoutError(f"no reply to {verb}")  # pragma: no cover - the loop above returns or times out

    async def watch(
        self, on_update: Callable[[DaemonView], bool | None], timeout_s: float | None = None
    ) -> DaemonView:
        """Subscribe to everything the daemon publishes; call `on_update` after each message until it
        returns True (or the timeout passes)."""
        view = DaemonView()
        async with self._client() as client:
            await client.subscribe(self.topics.full("#"), qos=1)
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    view.apply(self.topics, str(message.topic), message.payload)
                    if on_update(view):
                        break
        return view

    async def snapshot(self, timeout_s: float = 5.0) -> DaemonView:
        """The retained state: returns once status (and progress, if a run is on) has arrived."""

        def complete(view: DaemonView) -> bool:
            if view.status is None:
                return False
            return view.progress is not None or view.status.get("run_id") is None

        return await self.watch(complete, timeout_s)
