"""`kintsugi serve` as deployed: overhead per slice with its breakdown, event latency, memory growth.

    python -m benchmarks.bench_serve [--slices 100] [--long-slices 500]

Everything is a real process, as installed: a private Mosquitto with its ACL, the simulator at time scale 0
(its operations take no instrument time, so what remains is the daemon's and the simulator's computing),
and `kintsugi serve` with info-level JSON logging to a file, the journal and run directory on disk, and
profiling on (`KINTSUGI_PROFILE`, spans on the system's monotonic clock, written when it stops). An
operator starts the run over MQTT and a monitor subscribes to every event.

- Overhead per slice = the slice's wall time (checkpoint to checkpoint, in the daemon) minus the time spent
  inside instrument calls (HTTP round trips included), at 1024 x 768, CBS + TLD, segmentation off: median
  and p99, and where it goes (journal commits, image files, image decoding, logging, MQTT hand-over; the
  rest is the state machine and the event loop). The parts overlap a little (the MQTT publisher runs
  beside the run), so they need not add up exactly.
- Event latency: the monitor's receive time minus each event's `time` (the daemon's clock, same machine).
- Memory: the serve process's RSS after 50 slices and after the long run (512 x 384, `--long-slices`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

from benchmarks.bench_idle import intersect, length, minus, union
from benchmarks.readme_tables import Table, publish
from kintsugi_daemon.cli.remote import Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.broker import Access, LocalBroker
from kintsugi_daemon.demo.simulator_process import start_simulator
from kintsugi_daemon.service.messages import Topics
from kintsugi_daemon.service.profiling import PROFILE_ENV

INSTRUMENT = "bench-serve"
ACCESS = Access.single_site([INSTRUMENT])
USERS = {user: f"{user}-bench-secret" for user in ACCESS.users}
RECIPE = """
[run]
name = "bench-serve"
slices = {slices}
slice_thickness_m = 40e-9
[roi]
width_m = 40e-6
height_m = 30e-6
[imaging]
detectors = ["cbs", "tld"]
width_px = {width}
height_px = {height}
pixel_size_m = 4.05e-8
[segmentation]
enabled = false
[guards]
min_free_disk_bytes = 0
"""
PARTS = (
    ("journal", "journal commits"),
    ("storage", "image files"),
    ("decode", "image decoding"),
    ("logging", "logging (JSON)"),
    ("mqtt", "MQTT hand-over"),
)


def settings_toml(root: Path, broker: LocalBroker, url: str, token: str) -> Path:
    path = root / "daemon.toml"
    path.write_text(f"""
instrument_id = "{INSTRUMENT}"
data_root = "{root / "runs"}"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
username = "{INSTRUMENT}"
password = "{USERS[INSTRUMENT]}"
[instrument]
url = "{url}"
token = "{token}"
[logging]
level = "info"
json_output = true
""")
    return path


async def one_run(slices: int, width: int, height: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "runs").mkdir()
        broker = LocalBroker(root / "broker", embedded=False, access=ACCESS, passwords=USERS)
        broker.start()
        try:
            sim_args = ["--time-scale", "0", "--slices", str(slices), "--width-px", str(width)]
            sim_args += ["--height-px", str(height), "--pixel-size-m", "4.05e-8"]
            async with start_simulator(sim_args, log_path=root / "sim.log") as sim:
                return await _serve(root, broker, sim.url, sim.token, slices, width, height)
        finally:
            broker.kill()


async def _serve(
    root: Path, broker: LocalBroker, url: str, token: str, slices: int, width: int, height: int
) -> dict[str, Any]:
    config = settings_toml(root, broker, url, token)
    profile = root / "profile.jsonl"
    log = (root / "daemon.log").open("ab")
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kintsugi_daemon.cli",
        "serve",
        "--config",
        str(config),
        stdout=log,
        stderr=log,
        env={**os.environ, PROFILE_ENV: str(profile)},
    )
    log.close()
    proc = psutil.Process(daemon.pid)
    topics = Topics(INSTRUMENT)
    latencies: list[float] = []
    rss: dict[int, float] = {}
    done = asyncio.Event()
    ready = asyncio.Event()

    async def monitor() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", broker.port, username="monitor", password=USERS["monitor"]
        ) as client:
            await client.subscribe(topics.full("#"), qos=1)
            async for message in client.messages:
                now = time.time()
                topic = str(message.topic)
                if topic == topics.status and b'"idle"' in bytes(message.payload) and not ready.is_set():
                    rss[0] = proc.memory_info().rss / 2**20  # up and idle, before the run
                    ready.set()
                if "/events/" not in topic:
                    continue
                event = json.loads(message.payload)
                latencies.append(now - datetime.fromisoformat(event["time"]).timestamp())
                kind = topic.rsplit("/", 1)[-1]  # the envelope's type carries a prefix; the topic does not
                if kind == "slice_completed":
                    n = int(event["data"]["slice"]) + 1
                    if n in (1, 50, slices):
                        rss[n] = proc.memory_info().rss / 2**20
                if kind in ("done", "fault"):
                    done.set()
                    return

    watcher = asyncio.create_task(monitor())
    operator = Operator(
        MqttSettings(host="127.0.0.1", port=broker.port, username="operator", password=USERS["operator"]),
        INSTRUMENT,
    )
    await asyncio.wait_for(ready.wait(), 60)
    recipe = RECIPE.format(slices=slices, width=width, height=height)
    reply = await operator.command("start", {"recipe": recipe}, 30)  # the daemon said idle: it is up
    assert reply["accepted"], reply
    finished = asyncio.ensure_future(done.wait())
    await asyncio.wait([watcher, finished], timeout=60 + slices * 5, return_when=asyncio.FIRST_COMPLETED)
    if watcher.done() and watcher.exception():
        raise RuntimeError(f"monitor failed: {watcher.exception()!r}; daemon log {root / 'daemon.log'}")
    if not done.is_set():
        raise RuntimeError(f"the run did not finish; daemon log: {(root / 'daemon.log').read_text()[-2000:]}")
    daemon.send_signal(signal.SIGTERM)
    await asyncio.wait_for(daemon.wait(), 60)
    watcher.cancel()
    spans = [json.loads(line) for line in profile.read_text().splitlines()]
    return {"spans": spans, "latencies": latencies, "rss": rss, "slices": slices}


def overheads(spans: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
    """Per slice (checkpoint to checkpoint): the time outside instrument calls, and each part's share of
    it (spans clipped to that time: a commit overlapping an instrument call costs the instrument nothing)."""
    ends = sorted(s["start_s"] for s in spans if s["kind"] == "slice_end")
    calls = union((s["start_s"], s["end_s"]) for s in spans if s["kind"].startswith("call:"))
    by_kind = {k: union((s["start_s"], s["end_s"]) for s in spans if s["kind"] == k) for k, _ in PARTS}
    per_slice: list[float] = []
    parts: dict[str, list[float]] = {k: [] for k, _ in PARTS}
    for a, b in itertools.pairwise(ends):  # from the second checkpoint: the first slice carries preflight
        outside = minus([(a, b)], calls)
        per_slice.append(length(outside))
        for key, _ in PARTS:
            parts[key].append(length(intersect(outside, by_kind[key])))
    return per_slice, parts


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=100, help="slices of the overhead run (1024 x 768)")
    p.add_argument("--long-slices", type=int, default=500, help="slices of the memory run (512 x 384)")
    args = p.parse_args(argv)
    short = asyncio.run(one_run(args.slices, 1024, 768))
    per_slice, parts = overheads(short["spans"])
    med, p99 = statistics.median(per_slice) * 1e3, _pct(per_slice, 0.99) * 1e3
    rest = [o - sum(parts[k][i] for k, _ in PARTS) for i, o in enumerate(per_slice)]
    shares = [statistics.median(parts[key]) * 1e3 for key, _ in PARTS] + [statistics.median(rest) * 1e3]
    long = asyncio.run(one_run(args.long_slices, 512, 384))
    lat = long["latencies"] + short["latencies"]
    med_lat, p99_lat = statistics.median(lat) * 1e3, _pct(lat, 0.99) * 1e3
    rss, n = long["rss"], args.long_slices
    table = Table(["figure", "target", "latest"])
    table.add(
        f"`kintsugi serve` overhead per slice, median / p99 ({args.slices} slices, 1024 × 768)",
        "≤ 50 / ≤ 150 ms",
        f"{med:.1f} ms / {p99:.1f} ms{_verdict(med <= 50 and p99 <= 150)}",
    )
    table.add(
        "where it goes (median per slice): " + " / ".join(label for _, label in PARTS) + " / the rest "
        "(state machine, event loop)",
        "-",
        " / ".join(f"{v:.1f}" for v in shares) + " ms",
    )
    table.add(
        f"event latency, journaled → a monitor via Mosquitto, {len(lat):,} events of both runs, median / p99",
        "p99 ≤ 20 ms",
        f"{med_lat:.1f} ms / {p99_lat:.1f} ms{_verdict(p99_lat <= 20)}",
    )
    if {0, 1, 50, n} <= rss.keys():
        table.add(
            f"RSS of `kintsugi serve` over a {n}-slice run (512 × 384): idle before it → after slice 1 → "
            f"slice 50 → slice {n}; growth over the run",
            "≤ 20 MB",
            f"{rss[0]:.1f} → {rss[1]:.1f} → {rss[50]:.1f} → {rss[n]:.1f} MB; "
            f"{rss[n] - rss[0]:+.1f} MB{_verdict(rss[n] - rss[0] <= 20)}",
        )
    publish("serve", table)
    return 0


def _verdict(ok: bool) -> str:
    return "" if ok else " (**missed**)"


if __name__ == "__main__":
    raise SystemExit(main())
