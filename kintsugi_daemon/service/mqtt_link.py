"""The daemon's MQTT link: outbox -> broker publisher, retained status with a Last Will, command intake.

Delivery rules (DESIGN.md, "Events over MQTT"):
- Events live in the journal's outbox until the broker has acknowledged them (QoS 1 PUBACK); only then
  are they marked sent. A fresh MQTT session per connection means nothing is half-sent inside the
  client library: after an outage the publisher simply starts again from the oldest unsent seq.
  Up to `window` events are in flight on the one TCP stream, so the broker still receives them in
  seq order, and only the acknowledged prefix of a window is marked sent.
- QoS 1 is at-least-once: an event whose PUBACK was lost with the connection is sent again. Subscribers
  that must not see a repeat drop envelopes whose (session, seq) they already have.
- Retained topics (status, description, progress, alerts, slices/latest) are re-asserted on every
  (re)connect, so a broker restarted without persistence is repaired within one reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from paho.mqtt import client as paho_client
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel, ValidationError

from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.service import mqtt_client, profiling
from kintsugi_daemon.service.messages import (
    COMMAND_MODELS,
    PROGRESS,
    STATUS,
    Alert,
    Command,
    CommandReply,
    Description,
    OutboxRecord,
    Progress,
    Status,
    Topics,
    alert_suffix,
    envelope_from_outbox,
)

__all__ = ["CommandHandler", "LinkTuning", "MqttLink", "Outbox"]

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """The slice of the journal the link uses (journal.Journal satisfies it)."""

    def pending_events(self, limit: int = 256) -> Sequence[OutboxRecord]: ...
    def mark_sent(self, seqs: Sequence[int]) -> None: ...
    def unsent_count(self) -> int: ...
    def command_reply(self, command_id: str) -> dict[str, Any] | None: ...
    def record_command(self, command_id: str, verb: str, reply: dict[str, Any]) -> None: ...


CommandHandler = Callable[[str, Command], Awaitable[CommandReply]]


@dataclass(frozen=True)
class LinkTuning:
    """How the link paces itself; the connection itself is `config.MqttSettings` (the `[mqtt]` section)."""

    timeout_s: float = 10.0  # per MQTT operation (CONNACK, PUBACK, SUBACK)
    backoff_min_s: float = 0.5
    backoff_max_s: float = 10.0  # a daemon waits at most this long after the broker is back
    fallback_poll_s: float = 2.0  # outbox re-read without notify(): covers writers that forget it
    batch: int = 256  # events read from the outbox at a time
    window: int = 16  # QoS 1 publishes in flight at once (paho's default in-flight limit is 20)
    max_command_bytes: int = 64 * 1024  # fits an inline recipe with comments; refuses floods
    command_max_age_s: float = 60.0
    command_max_future_s: float = 10.0
    shutdown_flush_s: float = 5.0  # on close(): how long to keep draining the outbox before `offline`


def _json(payload: BaseModel | Mapping[str, Any]) -> bytes:
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode()
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


class _Refused(Exception):
    """A command refused before it reached the handler; the message goes into the reply."""


class MqttLink:
    """Runs until `close()` (or cancellation): `async with asyncio.TaskGroup() as tg:
    tg.create_task(link.run(), name="mqtt")`. Call `notify()` after appending events to the outbox and
    `publish_status()` after every state change."""

    def __init__(
        self,
        settings: MqttSettings,
        instrument_id: str,
        outbox: Outbox,
        *,
        status_provider: Callable[[], Status],
        description_provider: Callable[[], Description],
        command_handler: CommandHandler,
        progress_provider: Callable[[], Progress | None] = lambda: None,
        alerts_provider: Callable[[], Iterable[Alert]] | None = None,
        clock: Callable[[], float] = time.time,
        tuning: LinkTuning = LinkTuning(),
    ) -> None:
        self.settings = settings
        self.tuning = tuning
        self.instrument_id = instrument_id
        self.topics = Topics(instrument_id)
        self._outbox = outbox
        self._status = status_provider
        self._description = description_provider
        self._progress = progress_provider
        self._alerts = alerts_provider
        self._handler = command_handler
        self._clock = clock
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        # Last payload per retained topic published through this link, re-asserted on reconnect
        # (an empty payload is a clear and is re-asserted too).
        self._retained: dict[str, bytes] = {}
        self.connections = 0  # successful connects so far (tests and logs)
        self._failures = 0  # consecutive failed connects: the backoff exponent
        # MQTT 5 so the command subscription can ask for retain-as-published: only then does a retained
        # command published while we are connected arrive with its retain flag (for live subscribers a
        # 3.1.1 broker clears it). "3.1.1" is for brokers without MQTT 5 (the demo's embedded amqtt).
        v5 = settings.protocol == "5"
        self.protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311

    # -- public surface ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def client(self) -> aiomqtt.Client | None:
        """The live client, or None between connections."""
        return self._client

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def notify(self) -> None:
        """New events are in the outbox: wake the publisher."""
        self._wake.set()

    def close(self) -> None:
        """Ask `run()` to drain the outbox (bounded), publish `offline` and disconnect cleanly."""
        self._closing.set()
        self._wake.set()

    async def publish_status(self) -> bool:
        """Call on every state change: the retained `status` follows the state machine."""
        return await self.publish_retained(STATUS, self._status_now())

    async def publish_progress(self, progress: Progress) -> bool:
        return await self.publish_retained(PROGRESS, progress)

    async def publish_alert(self, alert: Alert) -> bool:
        return await self.publish_retained(alert_suffix(alert.id), alert)

    async def clear_alert(self, alert_id: str) -> bool:
        return await self.clear_retained(alert_suffix(alert_id))

    async def publish_retained(self, topic_suffix: str, payload: BaseModel | Mapping[str, Any]) -> bool:
        """Publish retained at QoS 1. While disconnected it is kept and sent on reconnect; returns
        whether the broker acknowledged it now."""
        return await self._set_retained(topic_suffix, _json(payload))

    async def clear_retained(self, topic_suffix: str) -> bool:
        return await self._set_retained(topic_suffix, b"")

    async def publish_retained_bytes(self, topic: str, payload: bytes, *, absolute: bool = False) -> bool:
        """Raw bytes, retained, re-asserted on every reconnect like the rest: an image preview under our
        root, or (`absolute`) a topic outside it, such as Home Assistant's discovery configs."""
        return await self._set_retained(topic, payload, absolute=absolute)

    async def publish_metrics(self, values: Mapping[str, float | int | bool]) -> bool:
        """QoS 0, not retained, dropped while disconnected: metrics are a live feed, not a record."""
        client = self._client
        if client is None:
            return False
        try:
            await mqtt_client.call(client.publish(self.topics.metrics, _json(values), qos=0))
        except aiomqtt.MqttError as exc:
            log.debug("metrics not published: %s", exc)
            return False
        return True

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; returns after `close()`."""
        while not self._closing.is_set():
            try:
                await self._connection()
                return  # closed cleanly
            # A journal that cannot be written (a full disk: SQLite's "database or disk is full") is
            # survived like a lost broker: back off and reconnect; the unsent events are replayed.
            except (aiomqtt.MqttError, sqlite3.OperationalError) as exc:
                t = self.tuning
                delay = min(t.backoff_max_s, t.backoff_min_s * 2**self._failures)
                delay *= random.uniform(0.5, 1.0)  # jitter: a fleet of daemons must not reconnect in step
                self._failures += 1
                log.warning("mqtt: %s; reconnecting in %.1f s", exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()

    # -- one connection --------------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        lost = Status(state="lost", session=self._status().session, reason="connection lost")
        tls = aiomqtt.TLSParameters(ca_certs=str(s.ca_file) if s.ca_file else None) if s.tls else None
        # A clean session either way: commands sent while we were away are stale; events are ours.
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        client = aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.resolved_password(),
            identifier=s.client_id or f"kintsugi-daemon-{self.instrument_id}",
            will=aiomqtt.Will(self.topics.status, _json(lost), qos=1, retain=True),
            protocol=self.protocol,
            # paho takes clean_start under MQTT 5 and clean_session under 3.1.1, never both.
            clean_session=None if v5 else True,
            clean_start=True if v5 else paho_client.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=s.keepalive_s,
            timeout=self.tuning.timeout_s,
            tls_params=tls,
            socket_options=mqtt_client.NO_DELAY,
        )
        client.pending_calls_threshold = (
            self.tuning.window + 16
        )  # a full window is normal, not worth a warning
        return client

    async def _connection(self) -> None:
        client = self._make_client()
        before = mqtt_client.cancel_requests()
        async with client:
            self._client = client
            try:
                mqtt_client.reraise_dropped_cancel(before)  # the connect waits with wait_for too
                self.connections += 1
                try:
                    await self._announce(client)
                    self._failures = 0
                    self._connected.set()
                    log.info("mqtt: connected to %s:%d", self.settings.host, self.settings.port)
                    async with asyncio.TaskGroup() as tg:
                        commands = tg.create_task(self._serve_commands(client), name="mqtt-commands")
                        await self._publish_outbox(client)  # returns only once closing and drained
                        commands.cancel()
                except BaseExceptionGroup as group:
                    raise _unwrap(group) from None
                except asyncio.CancelledError:
                    # Cancelled from outside (service shutdown without close()), at any point after the
                    # connect, the announcement included: a watcher that saw `online` must see `offline`.
                    self._connected.clear()
                    await self._say_offline(client, "cancelled")
                    raise
                self._connected.clear()
                await self._say_offline(client, "shutdown")
            finally:
                self._connected.clear()
                self._client = None

    async def _announce(self, client: aiomqtt.Client) -> None:
        """On every connect: subscribe to commands, then status (clears a `lost` Last Will), then the
        rest retained. Subscribing first matters: an operator who sees our status may command at once."""
        if self.protocol == aiomqtt.ProtocolVersion.V5:
            options = SubscribeOptions(qos=1, retainAsPublished=True)
            await mqtt_client.call(client.subscribe(self.topics.commands, options=options))
        else:
            await mqtt_client.call(client.subscribe(self.topics.commands, qos=1))
        retained = self._retained
        retained.pop(self.topics.status, None)
        retained[self.topics.description] = _json(self._description())
        progress = self._progress()
        if progress is not None:
            retained[self.topics.progress] = _json(progress)
        if self._alerts is not None:
            # The provider is the truth: an alert that ended while we were away is cleared now.
            active = {self.topics.alert(a.id): _json(a) for a in self._alerts()}
            for topic in retained:
                if topic.startswith(self.topics.root + "alerts/") and topic not in active:
                    retained[topic] = b""
            retained.update(active)
        status = _json(self._status_now())
        await mqtt_client.call(client.publish(self.topics.status, status, qos=1, retain=True))
        for topic, payload in list(retained.items()):
            await mqtt_client.call(client.publish(topic, payload, qos=1, retain=True))

    def _status_now(self, **update: Any) -> Status:
        return self._status().model_copy(update={"ts": self._clock(), **update})

    async def _say_offline(self, client: aiomqtt.Client, reason: str) -> None:
        status = self._status_now(state="offline", reason=reason)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(self.tuning.timeout_s):
                await client.publish(self.topics.status, _json(status), qos=1, retain=True)

    async def _set_retained(self, topic_suffix: str, payload: bytes, *, absolute: bool = False) -> bool:
        topic = topic_suffix if absolute else self.topics.full(topic_suffix)
        self._retained[topic] = payload
        client = self._client
        if client is None:
            return False
        try:
            await mqtt_client.call(client.publish(topic, payload, qos=1, retain=True))
        except aiomqtt.MqttError as exc:
            log.debug("retained %s not published now (re-sent on reconnect): %s", topic, exc)
            return False
        return True

    # -- outbox publisher ------------------------------------------------------------------------

    async def _publish_outbox(self, client: aiomqtt.Client) -> None:
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # before reading: a notify() during the read is not lost
            batch = self._outbox.pending_events(self.tuning.batch)
            if self._closing.is_set():
                deadline = deadline or loop.time() + self.tuning.shutdown_flush_s
                if not batch or loop.time() > deadline:
                    return
            for start in range(0, len(batch), self.tuning.window):
                await self._publish_window(client, batch[start : start + self.tuning.window])
            if not batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tuning.fallback_poll_s):
                        await self._wake.wait()

    async def _publish_window(self, client: aiomqtt.Client, events: Sequence[OutboxRecord]) -> None:
        """Up to `window` events in flight at once (one TCP stream, so the broker gets them in seq
        order); then the acknowledged prefix is marked sent in one transaction. A failure leaves it
        and everything after it unsent, so "sent" never skips ahead of an unacknowledged event."""
        with profiling.span("mqtt"):  # the daemon's share: payloads built and handed over (acks overlap)
            wires = [self._wire(event) for event in events]
            # Tasks start in creation order, and each hands its packet to paho before its first await.
            tasks = [asyncio.create_task(client.publish(t, payload, qos=1)) for t, payload in wires]
        for task in tasks:
            task.add_done_callback(_consume)  # the first failure is raised below; silence the rest
        acked: list[int] = []
        try:
            for event, task in zip(events, tasks, strict=True):
                await task
                acked.append(event.seq)
        finally:
            for task in tasks:
                task.cancel()
            if acked:
                self._outbox.mark_sent(acked)

    def _wire(self, event: OutboxRecord) -> tuple[str, bytes]:
        """Topic and envelope of one event. A row that cannot go out as journaled (a topic with
        wildcards, an invalid type) goes out as `unpublishable`: one bad row must neither wedge the
        outbox nor leave a gap in seq."""
        try:
            if not event.topic or any(c in event.topic for c in "+#\0"):
                raise ValueError(f"topic {event.topic!r} is not publishable")
            return self.topics.full(event.topic), _json(envelope_from_outbox(event, self.instrument_id))
        except (ValueError, TypeError) as exc:
            log.error("event seq %d sent as a placeholder: %s", event.seq, exc)
            data = {"type": str(event.type)[:100], "topic": str(event.topic)[:200], "error": str(exc)[:500]}
            stub = _Stub(event.seq, "unpublishable", event.run_id, event.session, event.time, data)
            return self.topics.event(stub.type), _json(envelope_from_outbox(stub, self.instrument_id))

    # -- commands --------------------------------------------------------------------------------

    async def _serve_commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            verb = message.topic.value.rsplit("/", 1)[-1]
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if not payload:
                continue  # an empty payload clears a retained message from the broker: not a command
            reply = await self._command(verb, payload, retained=message.retain)
            await mqtt_client.call(client.publish(self.topics.reply(verb), _json(reply), qos=1))

    async def _command(self, verb: str, payload: bytes, *, retained: bool) -> CommandReply:
        command_id: str | None = None
        try:
            raw = self._parse(payload)
            if isinstance(raw.get("command_id"), str):
                command_id = raw["command_id"]
            if verb not in COMMAND_MODELS:
                raise _Refused(f"unknown verb {verb!r}; known: {', '.join(COMMAND_MODELS)}")
            if retained:
                raise _Refused("retained command refused: commands must be live (publish with retain=false)")
            try:
                command = COMMAND_MODELS[verb].model_validate(raw)
            except ValidationError as exc:
                raise _Refused("invalid command: " + _errors(exc)) from None
            previous = self._outbox.command_reply(command.command_id)
            if previous is not None:
                return CommandReply.model_validate(previous)  # a duplicate: same answer, no re-run
            self._check_fresh(command.sent_at)
        except _Refused as refusal:
            log.warning("mqtt: command %s/%s refused: %s", verb, command_id, refusal)
            return self._refusal(command_id, verb, str(refusal))
        try:
            reply = await self._handler(verb, command)
        except Exception as exc:
            log.exception("command handler failed on %s %s", verb, command.command_id)
            reply = self._refusal(command.command_id, verb, f"internal error: {type(exc).__name__}: {exc}")
        # The handler may record the reply itself, in the transaction of the state change it caused
        # (then a crash cannot separate them); otherwise the link records it here.
        if self._outbox.command_reply(command.command_id) is None:
            self._outbox.record_command(command.command_id, verb, reply.model_dump(mode="json"))
        return reply

    def _parse(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > self.tuning.max_command_bytes:
            raise _Refused(f"payload of {len(payload)} bytes exceeds {self.tuning.max_command_bytes}")
        try:
            raw = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise _Refused(f"malformed JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise _Refused("the payload must be a JSON object")
        return raw

    def _check_fresh(self, sent_at: float) -> None:
        age = self._clock() - sent_at
        if age > self.tuning.command_max_age_s:
            raise _Refused(f"stale command: sent {age:.0f} s ago (limit {self.tuning.command_max_age_s:g} s)")
        if -age > self.tuning.command_max_future_s:
            raise _Refused(f"command sent_at is {-age:.0f} s in the future: check the sender's clock")

    def _refusal(self, command_id: str | None, verb: str, error: str) -> CommandReply:
        return CommandReply(
            command_id=command_id,
            verb=verb,
            accepted=False,
            error=error,
            state=self._status().path or "unknown",
            ts=self._clock(),
        )


@dataclass(frozen=True)
class _Stub:
    seq: int
    type: str
    run_id: str | None
    session: str
    time: float
    data: Mapping[str, Any]
    topic: str = ""


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The TaskGroup's first MqttError as itself, so run() can reconnect; anything else stays grouped."""
    mqtt_errors, rest = group.split(aiomqtt.MqttError)
    if mqtt_errors is not None and rest is None:
        first: BaseException = mqtt_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        return first
    return group


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )
