"""MQTT benchmark against a private Mosquitto: event latency (journal append -> subscriber receipt,
target p99 <= 20 ms) and a broker outage while events keep being journaled (target 0 lost, 0 duplicated,
contiguous seq at a clean_session=False QoS 1 subscriber).

Run from the repository root: `python -m benchmarks.bench_mqtt [--events N] [--outage-s S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from benchmarks.readme_tables import Table, publish
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.broker import Access, LocalBroker, mosquitto_binaries
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.service.messages import Command, CommandReply, Description, Status, Topics
from kintsugi_daemon.service.mqtt_link import MqttLink

LATENCY_P99_TARGET_MS = 20.0
INSTRUMENT = "bench"
ACCESS = Access.single_site([INSTRUMENT])
USERS: dict[str, str] = {user: f"{user}-bench-secret" for user in ACCESS.users}


@dataclass
class Subscriber:
    """A monitoring tool: persistent session, QoS 1, reconnects by itself after a broker outage."""

    broker: LocalBroker
    received: list[tuple[int, float]] = field(default_factory=list)  # (seq, perf_counter at receipt)
    packet_ids: list[int] = field(default_factory=list)  # MQTT packet id of each delivery
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        topics = Topics(INSTRUMENT)
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    username="monitor",
                    password=USERS["monitor"],
                    identifier="bench-subscriber",
                    clean_session=False,
                ) as client:
                    await client.subscribe(topics.root + "events/#", qos=1)
                    self.ready.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.received.append((json.loads(message.payload)["seq"], time.perf_counter()))
                        self.packet_ids.append(message.mid)
                        self.arrived.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)  # broker down: retry, as a monitoring tool would

    async def wait_for(self, seq: int, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                while not self.received or self.received[-1][0] < seq:
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            return False
        return True


async def _refuse(verb: str, command: Command) -> CommandReply:
    return CommandReply(command_id=command.command_id, verb=verb, accepted=False, error="bench", state="idle")


@asynccontextmanager
async def setup(directory: Path) -> AsyncIterator[tuple[LocalBroker, Journal, MqttLink, Subscriber]]:
    # Mosquitto only, persistence on: the outage figure needs its persistent sessions across a restart.
    broker = LocalBroker(
        directory / "broker", embedded=False, access=ACCESS, passwords=USERS, persistence=True
    )
    broker.start()
    journal = Journal(directory / "journal.sqlite", session="bench")
    link = MqttLink(
        MqttSettings(host=broker.host, port=broker.port, username=INSTRUMENT, password=USERS[INSTRUMENT]),
        INSTRUMENT,  # default LinkTuning backoff (0.5 .. 10 s): the replay time after an outage includes it
        journal,
        status_provider=lambda: Status(state="online", path="running.mill", session="bench", ts=time.time()),
        description_provider=lambda: Description(
            instrument_id=INSTRUMENT, version="bench", states=["running"], detectors=["cbs"]
        ),
        command_handler=_refuse,
    )
    subscriber = Subscriber(broker)
    try:
        async with asyncio.TaskGroup() as tg:
            link_task = tg.create_task(link.run(), name="mqtt-link")
            sub_task = tg.create_task(subscriber.run(), name="subscriber")
            async with asyncio.timeout(10):
                await link.wait_connected()
                await subscriber.ready.wait()
            yield broker, journal, link, subscriber
            link.close()
            await link_task
            sub_task.cancel()
    finally:
        journal.close()
        broker.kill()


def append(journal: Journal, link: MqttLink, i: int) -> None:
    journal.publish([EventDraft("step_completed", {"i": i, "step": "mill"}, run_id="bench-run")])
    link.notify()


async def latency(n: int, interval_s: float) -> tuple[str, str, str]:
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        async with setup(Path(tmp)) as (_, journal, link, subscriber):
            appended: dict[int, float] = {}
            first = journal.last_seq() + 1
            for i in range(n):
                t0 = time.perf_counter()
                append(journal, link, i)  # includes the fsynced commit, as a state change would
                appended[first + i] = t0
                await asyncio.sleep(interval_s)
            complete = await subscriber.wait_for(first + n - 1, timeout_s=30)
    got = {seq: t for seq, t in subscriber.received if seq in appended}
    ms = sorted((got[seq] - appended[seq]) * 1e3 for seq in got)
    p50, p99 = statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    verdict = "OK" if complete and p99 <= LATENCY_P99_TARGET_MS else "MISSED"
    every = f"one every {interval_s * 1e3:g} ms"
    return (
        f"the link alone: event latency, journal append (fsynced) → a subscriber, {len(got)} of {n} events "
        f"at {every}, median / p99 / max",
        f"p99 ≤ {LATENCY_P99_TARGET_MS:g} ms",
        f"{p50:.1f} / {p99:.1f} / {ms[-1]:.1f} ms" + ("" if verdict == "OK" else " (**missed**)"),
    )


async def outage(outage_s: float, rate_hz: float, lead_s: float) -> tuple[str, str, str]:
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        async with setup(Path(tmp)) as (broker, journal, link, subscriber):
            first = journal.last_seq() + 1
            stop_appending = asyncio.Event()
            marks: list[float] = []  # when the link reconnected after the restart
            count = 0

            async def producer() -> None:  # the run goes on regardless of the broker
                nonlocal count
                while not stop_appending.is_set():
                    append(journal, link, count)
                    count += 1
                    await asyncio.sleep(1 / rate_hz)

            task = asyncio.create_task(producer(), name="producer")
            await asyncio.sleep(lead_s)
            broker.stop()
            during = count
            await asyncio.sleep(outage_s)
            backlog = journal.unsent_count()
            during = count - during
            count_at_restart = count
            await broker.start_async()
            t_restart = time.perf_counter()
            reconnected = asyncio.create_task(link.wait_connected(), name="reconnected")
            reconnected.add_done_callback(lambda _: marks.append(time.perf_counter()))
            await asyncio.sleep(lead_s)
            stop_appending.set()
            await task
            last = first + count - 1
            complete = await subscriber.wait_for(last, timeout_s=60)
            reconnect_s = marks[0] - t_restart if marks else float("nan")
            # The last backlog event: the one journaled just before the restart.
            backlog_last = [t for seq, t in subscriber.received if seq == first + count_at_restart - 1]
            replayed_s = backlog_last[0] - marks[0] if backlog_last and marks else float("nan")
            with contextlib.suppress(TimeoutError):  # mark_sent follows the PUBACK, maybe after receipt
                async with asyncio.timeout(10):
                    while journal.unsent_count():  # noqa: ASYNC110 (a SQLite count: no event to await)
                        await asyncio.sleep(0.05)
            unsent = journal.unsent_count()
    seqs = [seq for seq, _ in subscriber.received]
    expected = set(range(first, last + 1))
    lost = len(expected - set(seqs))
    duplicated = len(seqs) - len(set(seqs))
    # A repeat under the packet id of the first copy is the broker redelivering a QoS 1 message whose
    # PUBACK from the subscriber it had not processed when it stopped; a new packet id means the daemon
    # published the event again (its PUBACK was lost with the connection).
    first_id: dict[int, int] = {}
    redelivered = 0
    for seq, packet_id in zip(seqs, subscriber.packet_ids, strict=True):
        if seq in first_id:
            redelivered += first_id[seq] == packet_id
        else:
            first_id[seq] = packet_id
    unique = list(dict.fromkeys(seqs))  # what a subscriber that drops seen (session, seq) keeps
    contiguous = sorted(unique) == list(range(first, last + 1))
    in_order = all(a < b for a, b in itertools.pairwise(unique))
    ok = complete and lost == 0 and contiguous and in_order and unsent == 0
    print(
        f"outage: {duplicated} repeats ({redelivered} broker redeliveries, {duplicated - redelivered} "
        f"republished by the daemon); link back {reconnect_s:.2f} s after the broker, backlog delivered "
        f"{replayed_s:.2f} s after that; unsent after replay {unsent}"
    )
    return (
        f"broker stopped {outage_s:g} s mid-stream ({count} events journaled at {rate_hz:g} Hz, {during} "
        f"while it was down, {backlog} unsent when it came back): lost / repeated deliveries / seq "
        "contiguous and in order after dropping repeats",
        "0 / 0 / yes",
        f"{lost} / {duplicated} / {'yes' if contiguous and in_order else 'no'}"
        + (
            f" ({redelivered} redelivered by the broker, QoS 1's at-least-once; "
            f"{duplicated - redelivered} published twice by the daemon)"
            if duplicated
            else ""
        )
        + ("" if ok and duplicated == 0 else " (**missed**)"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_mqtt", description=__doc__)
    parser.add_argument("--events", type=int, default=1000, help="events for the latency figure")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="pause between events (latency)")
    parser.add_argument("--outage-s", type=float, default=30.0, help="broker outage; 0 skips it")
    parser.add_argument("--rate-hz", type=float, default=50.0, help="event rate during the outage run")
    parser.add_argument("--lead-s", type=float, default=2.0, help="events before and after the outage")
    args = parser.parse_args()
    if mosquitto_binaries() is None:
        raise SystemExit("mosquitto and mosquitto_passwd are needed (apt install mosquitto)")
    table = Table(["figure", "target", "latest"])
    table.add(*asyncio.run(latency(args.events, args.interval_ms / 1e3)))
    if args.outage_s > 0:
        table.add(*asyncio.run(outage(args.outage_s, args.rate_hz, args.lead_s)))
    publish("mqtt", table)


if __name__ == "__main__":
    main()
