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
from kintsugi_daemon.service import mqtt_client
from kintsugi_daemon.service.messages import SLICES_LATEST_PREVIEW, Topics

__all__ = ["DaemonView", "Operator", "OperatorError"]

REPLY_TIMEOUT_S = 15.0
# After the retained status arrives, the rest of the broker's retained burst (alerts, progress) follows
# within milliseconds; a snapshot waits for this much quiet so it never shows a state without its alerts.
RETAINED_QUIET_S = 0.3
# MQTT 3.1.1 CONNACK codes and their MQTT 5 reason codes, in words an operator can act on.
_NOT_AUTHORISED = {4, 5, 134, 135}


class OperatorError(RuntimeError):
    """What went wrong talking to the daemon, said so the operator knows what to check."""


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
    ignored: int = 0  # messages that were not the daemon's JSON (anyone may publish on a shared broker)
    last_ignored: str | None = None

    def apply(self, topics: Topics, topic: str, payload: bytes) -> None:
        suffix = topics.suffix(topic)
        if suffix is None or suffix == SLICES_LATEST_PREVIEW or suffix.startswith("cmd/"):
            return  # the preview is a PNG, not JSON; commands and replies are not the daemon's state
        try:
            data = json.loads(payload) if payload else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if payload and not isinstance(data, dict):
            self.ignored += 1
            self.last_ignored = suffix
            return
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
            eta, sigma = p.get("eta_s"), p.get("eta_uncertainty_s")
            eta_text = f"{eta / 60:.1f} min" if isinstance(eta, int | float) else "?"
            if isinstance(eta, int | float) and isinstance(sigma, int | float):
                eta_text = f"{eta / 60:.1f} ± {sigma / 60:.1f} min"
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
        if self.ignored:
            lines.append(
                f"ignored  {self.ignored} message(s) that were not JSON objects (last on {self.last_ignored})"
            )
        return "\n".join(lines)


def _json_object(payload: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(payload) if isinstance(payload, bytes | str) and payload else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class Operator:
    def __init__(self, settings: MqttSettings, instrument_id: str) -> None:
        self.settings = settings
        self.topics = Topics(instrument_id)

    @property
    def _who(self) -> str:
        s = self.settings
        return f"the broker at {s.host}:{s.port}" + (f" as user {s.username!r}" if s.username else "")

    @asynccontextmanager
    async def _client(self) -> AsyncIterator[aiomqtt.Client]:
        s = self.settings
        tls = aiomqtt.TLSParameters(ca_certs=str(s.ca_file) if s.ca_file else None) if s.tls else None
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.resolved_password(),
            identifier=f"kintsugi-cli-{uuid.uuid4().hex[:8]}",
            tls_params=tls,
            timeout=10,
            socket_options=mqtt_client.NO_DELAY,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            raise OperatorError(self._connect_refused(exc)) from None
        except aiomqtt.MqttError as exc:
            raise OperatorError(
                f"cannot reach {self._who}: {exc}. Check [mqtt] host and port in the config "
                "(or KINTSUGI_MQTT__HOST / KINTSUGI_MQTT__PORT) and that the broker is running"
            ) from None
        try:
            yield client
        finally:
            await client.__aexit__(None, None, None)

    def _connect_refused(self, exc: aiomqtt.MqttCodeError) -> str:
        code = getattr(exc.rc, "value", exc.rc)  # an int (MQTT 3.1.1) or a paho ReasonCode (MQTT 5)
        if code in _NOT_AUTHORISED:
            return (
                f"{self._who} refused the login ({exc}). Check the operator's credentials: --username and "
                "--password-file, [operator] username/password(_file) in the config, or "
                "KINTSUGI_OPERATOR__USERNAME / KINTSUGI_OPERATOR__PASSWORD; the broker's password file must "
                "know that user"
            )
        return f"{self._who} refused the connection ({exc})"

    async def command(
        self, verb: str, fields: dict[str, Any] | None = None, timeout_s: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """Publish `cmd/<verb>` and return its reply (OperatorError when none comes in time)."""
        payload = {"command_id": uuid.uuid4().hex, "sent_at": time.time(), **(fields or {})}
        async with self._client() as client:
            await mqtt_client.call(client.subscribe(self.topics.reply(verb), qos=1))
            await mqtt_client.call(client.publish(self.topics.command(verb), json.dumps(payload), qos=1))
            try:
                async with asyncio.timeout(timeout_s):
                    async for message in client.messages:
                        reply = _json_object(message.payload)
                        if reply is not None and reply.get("command_id") == payload["command_id"]:
                            return reply
            except TimeoutError:
                pass
        raise OperatorError(
            f"no reply to {verb} within {timeout_s:g} s from instrument {self.topics.instrument_id!r} via "
            f"{self._who}. Check that the daemon is running (`kintsugi status`), that instrument_id is "
            f"right, and that the broker's ACL lets this user write {self.topics.command(verb)} and read "
            "its reply (the `operator` role does)"
        )

    async def watch(
        self, on_update: Callable[[DaemonView], bool | None], timeout_s: float | None = None
    ) -> DaemonView:
        """Subscribe to everything the daemon publishes; call `on_update` after each message until it
        returns True (or the timeout passes)."""
        view = DaemonView()
        async with self._client() as client:
            await mqtt_client.call(client.subscribe(self.topics.full("#"), qos=1))
            async with asyncio.timeout(timeout_s):
                async for message in client.messages:
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    view.apply(self.topics, str(message.topic), payload)
                    if on_update(view):
                        break
        return view

    async def snapshot(self, timeout_s: float = 5.0) -> DaemonView:
        """The retained state: status, progress if a run is on, and every active alert. Returns once the
        status has come and the broker's retained burst has been quiet for RETAINED_QUIET_S."""
        view = DaemonView()
        async with self._client() as client:
            await mqtt_client.call(client.subscribe(self.topics.full("#"), qos=1))
            messages = aiter(client.messages)
            try:
                async with asyncio.timeout(timeout_s):
                    while True:
                        wait = RETAINED_QUIET_S if view.status is not None else None
                        try:
                            async with asyncio.timeout(wait):
                                message = await anext(messages)
                        except TimeoutError:
                            if view.status is not None:
                                return view
                            raise
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        view.apply(self.topics, str(message.topic), payload)
            except TimeoutError:
                pass
        raise OperatorError(
            f"no retained status for instrument {self.topics.instrument_id!r} within {timeout_s:g} s via "
            f"{self._who}. Check instrument_id, that the daemon has ever run against this broker, and that "
            "the ACL lets this user read kintsugi/v1/# (the `operator` and `monitor` roles do; `daemon` "
            "does not)"
        )
