"""MqttLink against a real Mosquitto (own config, passwords, ACL) and a real Journal.

Nothing here measures latency (benchmarks/bench_mqtt.py does); every wait is on a message or a
condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.service.messages import (
    Alert,
    Command,
    CommandReply,
    Description,
    Envelope,
    PauseCommand,
    Status,
    Topics,
    export_schemas,
)
from kintsugi_daemon.service.mqtt_link import LinkTuning, MqttLink
from tests.support.mqtt_broker import Broker, mosquitto_available, secret

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto binary not installed")

WAIT_S = 15.0


@pytest.fixture
def broker(tmp_path: Path, instrument: str) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", [instrument])
    b.start()
    try:
        yield b
    finally:
        b.kill()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite", session="sess-1") as j:
        yield j


@pytest.fixture
def instrument() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"  # unique topics per test


@dataclass
class Daemon:
    """Stands in for the state machine: providers plus a handler that records what it was given."""

    path: str = "idle"
    calls: list[tuple[str, Command]] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    refuse: str | None = None  # the state machine's verdict on every verb, when set

    def status(self) -> Status:
        return Status(state="online", path=self.path, session="sess-1", since=1.0, ts=time.time())

    def description(self) -> Description:
        return Description(
            instrument_id="x", version="0.1.0", states=["idle", "running"], detectors=["cbs", "tld"]
        )

    async def handle(self, verb: str, command: Command) -> CommandReply:
        self.calls.append((verb, command))
        if self.refuse is not None:
            return CommandReply(
                command_id=command.command_id, verb=verb, accepted=False, error=self.refuse, state=self.path
            )
        self.path = "paused" if verb == "pause" else self.path
        return CommandReply(command_id=command.command_id, verb=verb, accepted=True, state=self.path)


@asynccontextmanager
async def running_link(
    broker: Broker, journal: Journal, instrument: str, daemon: Daemon
) -> AsyncIterator[MqttLink]:
    link = MqttLink(
        MqttSettings(host=broker.host, port=broker.port, username=instrument, password=secret(instrument)),
        instrument,
        journal,
        status_provider=daemon.status,
        description_provider=daemon.description,
        alerts_provider=lambda: daemon.alerts,
        command_handler=daemon.handle,
        tuning=LinkTuning(backoff_min_s=0.1, backoff_max_s=0.5),
    )
    task = asyncio.create_task(link.run(), name="mqtt-link")
    try:
        async with asyncio.timeout(WAIT_S):
            await link.wait_connected()
        yield link
    finally:
        link.close()
        async with asyncio.timeout(WAIT_S):
            await task


def client(broker: Broker, user: str, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, username=user, password=secret(user), **kwargs)


async def next_message(c: aiomqtt.Client, topic: str | None = None) -> aiomqtt.Message:
    """The next message (on `topic`, if given), bounded by WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        async for message in c.messages:
            if topic is None or message.topic.matches(topic):
                return message
    raise AssertionError("message stream ended")


def body(message: aiomqtt.Message) -> Any:
    assert isinstance(message.payload, bytes)
    return json.loads(message.payload) if message.payload else None


async def wait_until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)


def append(journal: Journal, n: int, start: int = 0) -> None:
    journal.publish([EventDraft("step_completed", {"i": start + i}, run_id="run-1") for i in range(n)])


# -- status, Last Will, reconnect ---------------------------------------------------------------


async def test_status_online_then_offline_on_clean_close(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    topics, daemon = Topics(instrument), Daemon(path="running.mill")
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.status, qos=1)
        async with running_link(broker, journal, instrument, daemon) as link:
            online = await next_message(watcher)
            assert body(online)["state"] == "online" and body(online)["path"] == "running.mill"
            daemon.path = "paused"
            assert await link.publish_status()  # what the service calls on every state change
            changed = await next_message(watcher)
            assert body(changed)["state"] == "online" and body(changed)["path"] == "paused"
            async with client(broker, "monitor") as late:  # a late subscriber gets the retained copy
                await late.subscribe(topics.description, qos=1)
                desc = await next_message(late)
                assert desc.retain and Description.model_validate(body(desc)).detectors == ["cbs", "tld"]
            link.close()
        offline = await next_message(watcher)
        assert body(offline)["state"] == "offline" and body(offline)["reason"] == "shutdown"
    async with client(broker, "monitor") as late:
        await late.subscribe(topics.status, qos=1)
        retained = await next_message(late)
        assert retained.retain and Status.model_validate(body(retained)).state == "offline"


async def test_last_will_lost_on_unclean_drop_then_republished_on_reconnect(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    topics = Topics(instrument)
    daemon = Daemon(path="running.image")
    daemon.alerts.append(Alert(id="vacuum", severity="warning", message="chamber 2e-5 Pa", since=1.0))
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.root + "#", qos=1)
        async with running_link(broker, journal, instrument, daemon) as link:
            seen: list[tuple[str, Any]] = []
            while len({t for t, _ in seen} & {"status", "description", "alerts/vacuum"}) < 3:
                m = await next_message(watcher)
                seen.append((m.topic.value.removeprefix(topics.root), body(m)))
            assert seen[0] == ("status", seen[0][1]) and seen[0][1]["state"] == "online"
            disk = Alert(id="disk", severity="critical", message="full", since=2.0)
            daemon.alerts.append(disk)
            assert await link.publish_alert(disk)
            assert body(await next_message(watcher))["id"] == "disk"
            daemon.alerts.remove(disk)  # ends while the link is down: cleared on reconnect

            # Kill the TCP connection without an MQTT DISCONNECT, as a crash or a cut cable would.
            live = link.client
            assert live is not None
            sock = live._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)

            lost = await next_message(watcher, topics.status)
            assert body(lost)["state"] == "lost" and body(lost)["session"] == "sess-1"
            again: dict[str, Any] = {}
            while not {"status", "description", "alerts/vacuum", "alerts/disk"} <= again.keys():
                m = await next_message(watcher)
                again[m.topic.value.removeprefix(topics.root)] = body(m)
            assert again["status"]["state"] == "online" and again["status"]["path"] == "running.image"
            assert again["alerts/vacuum"]["message"] == "chamber 2e-5 Pa"
            assert again["alerts/disk"] is None  # empty retained payload: the alert is gone
            assert link.connections == 2


async def test_retained_publish_clear_and_metrics(broker: Broker, journal: Journal, instrument: str) -> None:
    topics = Topics(instrument)
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.root + "alerts/+", qos=1)
        await watcher.subscribe(topics.metrics, qos=0)
        async with running_link(broker, journal, instrument, Daemon()) as link:
            assert await link.publish_alert(Alert(id="disk", severity="critical", message="full", since=2.0))
            m = await next_message(watcher)
            assert m.topic.value == topics.alert("disk") and body(m)["severity"] == "critical"
            assert await link.clear_alert("disk")
            m = await next_message(watcher)
            assert m.topic.value == topics.alert("disk") and m.payload == b""
            assert await link.publish_metrics({"porosity": 0.12, "slice": 4})
            m = await next_message(watcher)
            assert m.topic.value == topics.metrics and body(m) == {"porosity": 0.12, "slice": 4}
    async with client(broker, "monitor") as late:  # the cleared alert is no longer retained
        await late.subscribe(topics.root + "alerts/+", qos=1)
        await late.subscribe(topics.status, qos=1)  # its retained copy comes after any retained alert
        assert (await next_message(late)).topic.value == topics.status


async def test_cancelled_link_still_says_offline(broker: Broker, journal: Journal, instrument: str) -> None:
    topics = Topics(instrument)
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.status, qos=1)
        link = MqttLink(
            MqttSettings(port=broker.port, username=instrument, password=secret(instrument)),
            instrument,
            journal,
            status_provider=Daemon().status,
            description_provider=Daemon().description,
            command_handler=Daemon().handle,
        )
        task = asyncio.create_task(link.run())
        assert body(await next_message(watcher))["state"] == "online"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        offline = body(await next_message(watcher))
        assert offline["state"] == "offline" and offline["reason"] == "cancelled"


async def test_link_socket_sends_small_packets_at_once(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    """TCP_NODELAY on the link's socket: without it, against a broker that also sends at once, each
    command's reply waited ~40 ms for a delayed ACK (the fuzz drill: 31 replies/s instead of ~190)."""
    async with running_link(broker, journal, instrument, Daemon()) as link:
        assert link.client is not None
        sock = link.client._client.socket()  # paho's socket under aiomqtt
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# -- events -------------------------------------------------------------------------------------


async def test_events_published_in_seq_order_at_qos1(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    topics = Topics(instrument)
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.root + "events/#", qos=1)
        async with running_link(broker, journal, instrument, Daemon()) as link:
            for batch in range(5):
                append(journal, 10, start=10 * batch)
                link.notify()
            got = [await next_message(watcher) for _ in range(50)]
        assert journal.unsent_count() == 0  # close() drained and every event was acknowledged
    envelopes = [Envelope.model_validate(body(m)) for m in got]
    assert [e.seq for e in envelopes] == list(range(1, 51))
    assert [e.data["i"] for e in envelopes] == list(range(50))
    assert all(m.qos == 1 and not m.retain for m in got)
    first = envelopes[0]
    assert first.type == "kintsugi.step_completed" and first.run_id == "run-1" and first.session == "sess-1"
    assert first.source == f"/kintsugi/v1/{instrument}" and first.id == "sess-1-1"
    assert got[0].topic.value == topics.event("step_completed")


async def test_unpublishable_row_keeps_seq_gap_free(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    topics = Topics(instrument)
    async with client(broker, "monitor") as watcher:
        await watcher.subscribe(topics.root + "events/#", qos=1)
        async with running_link(broker, journal, instrument, Daemon()) as link:
            journal.publish(
                [EventDraft("fault", {}), EventDraft("no such/type+", {}), EventDraft("resumed", {})]
            )
            link.notify()
            got = [Envelope.model_validate(body(await next_message(watcher))) for _ in range(3)]
    assert [(e.seq, e.type) for e in got] == [
        (1, "kintsugi.fault"),
        (2, "kintsugi.unpublishable"),
        (3, "kintsugi.resumed"),
    ]
    assert got[1].data["type"] == "no such/type+"


async def test_broker_outage_replays_backlog_without_loss_or_duplicates(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    topics = Topics(instrument)
    received: list[int] = []

    async def collect(until_seq: int) -> None:
        # A persistent session (clean_session=False, QoS 1) that the broker keeps across its restart.
        async with client(broker, "monitor", identifier=f"sub-{instrument}", clean_session=False) as sub:
            await sub.subscribe(topics.root + "events/#", qos=1)
            while (received[-1] if received else 0) < until_seq:
                received.append(Envelope.model_validate(body(await next_message(sub))).seq)

    await collect(0)  # the subscriber's session exists before the first event
    async with running_link(broker, journal, instrument, Daemon()) as link:
        append(journal, 10)
        link.notify()
        await collect(10)
        await wait_until(lambda: journal.unsent_count() == 0)

        broker.stop()
        await wait_until(lambda: not link.connected)
        for i in range(4):  # the run goes on: events keep being journaled during the outage
            append(journal, 5, start=10 + 5 * i)
            link.notify()
        assert journal.unsent_count() == 20
        await broker.start_async()
        await wait_until(lambda: link.connected)
        await collect(30)
        # A sentinel after the backlog: any duplicate would have been delivered before it.
        append(journal, 1, start=30)
        link.notify()
        await collect(31)
    assert received == list(range(1, 32))
    assert journal.unsent_count() == 0


# -- commands -----------------------------------------------------------------------------------


def command(**extra: Any) -> dict[str, Any]:
    return {"command_id": f"cmd-{uuid.uuid4().hex[:12]}", "sent_at": time.time(), **extra}


@asynccontextmanager
async def operator(broker: Broker, instrument: str) -> AsyncIterator[Callable[..., Awaitable[CommandReply]]]:
    """Yields `send(verb, payload, retain=False) -> reply` using operator credentials."""
    topics = Topics(instrument)
    async with client(broker, "operator") as op:
        await op.subscribe(topics.root + "cmd/+/reply", qos=1)

        async def send(verb: str, payload: bytes | dict[str, Any], *, retain: bool = False) -> CommandReply:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await op.publish(topics.command(verb), raw, qos=1, retain=retain)
            reply = await next_message(op, topics.reply(verb))
            assert reply.qos == 1 and not reply.retain
            return CommandReply.model_validate(body(reply))

        yield send


async def test_valid_command_reaches_handler_and_is_answered(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    daemon = Daemon(path="running.mill")
    async with running_link(broker, journal, instrument, daemon), operator(broker, instrument) as send:
        payload = command(now=True)
        reply = await send("pause", payload)
    assert reply.accepted and reply.error is None and reply.state == "paused"
    assert reply.command_id == payload["command_id"]
    assert daemon.calls == [("pause", PauseCommand.model_validate(payload))]
    assert journal.command_reply(payload["command_id"]) == reply.model_dump(mode="json")


@pytest.mark.parametrize(
    ("verb", "payload", "reason"),
    [
        ("pause", b"{not json", "malformed JSON"),
        ("pause", b"[1, 2]", "JSON object"),
        ("pause", command(now=True, speed=3), "speed: Extra inputs are not permitted"),
        ("pause", command(now="yes"), "now: Input should be a valid boolean"),
        ("pause", command(now=1), "now: Input should be a valid boolean"),  # no coercion
        ("pause", b'{"command_id": "cmd-12345678", "sent_at": NaN}', "NaN is not valid JSON"),
        ("pause", {"command_id": "short", "sent_at": 1.0}, "command_id"),
        ("pause", command(note="x" * 70_000), "exceeds"),
        ("explode", command(), "unknown verb 'explode'"),
        ("start", command(), "exactly one of recipe"),
        ("resume", {**command(), "sent_at": time.time() - 3600}, "stale command"),
        ("resume", {**command(), "sent_at": time.time() + 3600}, "in the future"),
    ],
    ids=[
        "malformed",
        "not-object",
        "unknown-field",
        "wrong-type",
        "coercion",
        "nan",
        "short-id",
        "oversized",
        "unknown-verb",
        "start-without-recipe",
        "stale",
        "future",
    ],
)
async def test_invalid_commands_are_refused_with_a_reason(
    broker: Broker, journal: Journal, instrument: str, verb: str, payload: bytes | dict[str, Any], reason: str
) -> None:
    daemon = Daemon(path="running.polish")
    async with running_link(broker, journal, instrument, daemon), operator(broker, instrument) as send:
        reply = await send(verb, payload)
    assert not reply.accepted and reply.error is not None and reason in reply.error
    assert reply.verb == verb and reply.state == "running.polish"
    assert daemon.calls == []
    if isinstance(payload, dict) and reason != "exceeds":  # an oversized payload is not even parsed
        assert reply.command_id == payload["command_id"]


async def test_retained_command_is_refused(broker: Broker, journal: Journal, instrument: str) -> None:
    topics, daemon = Topics(instrument), Daemon()
    async with client(broker, "operator") as op:
        await op.subscribe(topics.reply("abort"), qos=1)
        # Left retained on the broker (a careless tool): a daemon connecting later must not obey it.
        await op.publish(topics.command("abort"), json.dumps(command()), qos=1, retain=True)
        async with running_link(broker, journal, instrument, daemon):
            reply = CommandReply.model_validate(body(await next_message(op)))
        await op.publish(topics.command("abort"), b"", qos=1, retain=True)  # clear it
    assert not reply.accepted and reply.error is not None and "retained" in reply.error
    assert daemon.calls == []


async def test_retained_command_sent_while_connected_is_refused(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    """A live subscriber sees the retain flag cleared under MQTT 3.1.1; the link subscribes with MQTT 5
    retain-as-published so a retained command sent *during* a run is refused too."""
    topics, daemon = Topics(instrument), Daemon(path="running.mill")
    async with running_link(broker, journal, instrument, daemon), client(broker, "operator") as op:
        await op.subscribe(topics.root + "cmd/+/reply", qos=1)
        await op.publish(topics.command("abort"), json.dumps(command()), qos=1, retain=True)
        reply = CommandReply.model_validate(body(await next_message(op)))
        # Clearing it (an empty retained payload) is no command: no reply, nothing malformed. A reply to
        # it would arrive before the pause's: replies go out in the order the commands came in.
        await op.publish(topics.command("abort"), b"", qos=1, retain=True)
        await op.publish(topics.command("pause"), json.dumps(command()), qos=1)
        after = CommandReply.model_validate(body(await next_message(op)))
    assert reply.verb == "abort" and not reply.accepted
    assert reply.error is not None and "retained" in reply.error
    assert after.verb == "pause" and after.accepted
    assert [verb for verb, _ in daemon.calls] == ["pause"]


async def test_duplicate_command_id_gets_the_same_reply_and_runs_once(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    daemon = Daemon(path="running.mill")
    async with running_link(broker, journal, instrument, daemon), operator(broker, instrument) as send:
        payload = command(now=False)
        first = await send("pause", payload)
        second = await send("pause", payload)
    assert first.accepted and second == first
    assert len(daemon.calls) == 1


async def test_handler_refusal_is_recorded_and_replied(
    broker: Broker, journal: Journal, instrument: str
) -> None:
    daemon = Daemon(refuse="resume is not allowed in idle")
    async with running_link(broker, journal, instrument, daemon), operator(broker, instrument) as send:
        payload = command()
        reply = await send("resume", payload)
        again = await send("resume", payload)
    assert not reply.accepted and reply.error == "resume is not allowed in idle" and again == reply
    assert len(daemon.calls) == 1


async def test_monitor_cannot_command(broker: Broker, journal: Journal, instrument: str) -> None:
    daemon = Daemon(path="running.mill")
    async with running_link(broker, journal, instrument, daemon), operator(broker, instrument) as send:
        forbidden = command()
        monitor = client(broker, "monitor")
        async with monitor:
            await monitor.publish(Topics(instrument).command("abort"), json.dumps(forbidden), qos=1)
            allowed = command()
            reply = await send("abort", allowed)  # in order: a reply to `forbidden` would come first
        # Mosquitto 2.0 also drops a client that publishes outside its ACL; take note of that end so
        # asyncio does not report it as an unretrieved error.
        if monitor._disconnected.done():
            monitor._disconnected.exception()
    assert reply.command_id == allowed["command_id"]
    assert [c.command_id for _, c in daemon.calls] == [allowed["command_id"]]
    assert journal.command_reply(forbidden["command_id"]) is None


def test_nan_never_reaches_a_model() -> None:
    with pytest.raises(ValueError, match="finite"):
        PauseCommand.model_validate({"command_id": "cmd-12345678", "sent_at": math.nan})


# -- models and schemas (no broker needed) -----------------------------------------------------


def test_docs_schemas_are_current(tmp_path: Path) -> None:
    fresh = {p.name: p.read_text() for p in export_schemas(tmp_path)}
    docs = Path(__file__).parents[2] / "docs" / "schemas"
    assert {p.name: p.read_text() for p in docs.glob("*.json")} == fresh, (
        "regenerate: python -m kintsugi_daemon.service.messages --schemas docs/schemas"
    )


def test_topics_refuse_wildcards_and_separators() -> None:
    topics = Topics("helios-1")
    assert topics.status == "kintsugi/v1/helios-1/status"
    assert topics.reply("pause") == "kintsugi/v1/helios-1/cmd/pause/reply"
    assert topics.full("slices/latest") == topics.slices_latest
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(ValueError, match="topic level"):
            Topics(bad)
        with pytest.raises(ValueError, match="topic level"):
            topics.alert(bad)
