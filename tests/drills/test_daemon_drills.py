"""Fault drills with every part real: Mosquitto (own config, passwords, ACL), the simulator process and
`kintsugi serve` as its own process, driven by the operator's MQTT client: a broker outage mid-run, the
operator's command line, per-slice metrics. The SIGKILL drills are in test_sigkill_drill.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.service.journal import Journal
from tests.support.mqtt_broker import Broker, mosquitto_available, secret
from tests.support.simulator import SimStarter

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

INSTRUMENT_ID = "drill-01"
SLICES = 3
# At 1 nA a 10 x 8 um slice mills in ~6 s of instrument time: at time scale 0.15 about a second of
# wall time, long enough to kill the daemon inside it.
RECIPE = f"""
[run]
name = "drill"
slices = {SLICES}
slice_thickness_m = 40e-9

[roi]
width_m = 10e-6
height_m = 8e-6

[pt]
every_slices = 0

[mill]
current_a = 1e-9

[polish]
passes = 0

[imaging]
detectors = ["cbs", "tld"]
width_px = 192
height_px = 128
dwell_s = 2e-5

[segmentation]
enabled = false

[guards]
min_free_disk_bytes = 0
"""


@dataclass
class Drill:
    broker: Broker
    sim: SimulatorProcess
    root: Path

    def settings_file(self) -> Path:
        path = self.root / "daemon.toml"
        path.write_text(f"""
instrument_id = "{INSTRUMENT_ID}"
data_root = "{self.root / "runs"}"

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
username = "{INSTRUMENT_ID}"
password = "{secret(INSTRUMENT_ID)}"
keepalive_s = 5

[instrument]
url = "{self.sim.url}"
token = "{self.sim.token}"
deadline_scale = 0.2

[logging]
level = "info"
""")
        return path

    def operator(self) -> Operator:
        mqtt = MqttSettings(
            host="127.0.0.1", port=self.broker.port, username="operator", password=secret("operator")
        )
        return Operator(mqtt, INSTRUMENT_ID)

    async def start_daemon(self, log_name: str) -> asyncio.subprocess.Process:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - handed to the child process
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kintsugi_daemon.cli",
            "serve",
            "--config",
            str(self.settings_file()),
            stdout=log,
            stderr=log,
            env={**os.environ, "KINTSUGI_LOGGING__JSON_OUTPUT": "true"},
        )
        log.close()
        return proc

    async def wait_for(
        self, path: str | None, *, state: str = "online", timeout_s: float = 60.0
    ) -> DaemonView:
        """Until the retained status shows `state` (and the machine at `path`, when given)."""

        def done(view: DaemonView) -> bool:
            status = view.status or {}
            return status.get("state") == state and (path is None or status.get("path") == path)

        return await self.operator().watch(done, timeout_s)


@pytest.fixture
async def drill(start_sim: SimStarter, tmp_path: Path) -> AsyncIterator[Drill]:
    broker = Broker(tmp_path / "broker", [INSTRUMENT_ID])
    broker.start()
    try:
        async with start_sim("--time-scale", "0.15", "--test-endpoints") as sim:
            yield Drill(broker, sim, tmp_path)
    finally:
        broker.kill()


async def test_broker_outage_mid_run_loses_no_event(drill: Drill) -> None:
    """Mosquitto goes down for a while mid-run: the run goes on, and a persistent QoS 1 subscriber ends
    up with every event the daemon journaled, in order."""
    import aiomqtt

    seen: list[int] = []

    async def subscribe() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    drill.broker.port,
                    username="monitor",
                    password=secret("monitor"),
                    identifier="drill-monitor",
                    clean_session=False,
                ) as client:
                    await client.subscribe(f"kintsugi/v1/{INSTRUMENT_ID}/events/#", qos=1)
                    async for message in client.messages:
                        seen.append(json.loads(message.payload)["seq"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    listener = asyncio.create_task(subscribe())
    daemon = await drill.start_daemon("daemon.log")
    try:
        await drill.wait_for("idle")
        assert (await drill.operator().command("start", {"recipe": RECIPE}))["accepted"]
        await drill.wait_for("running.image")
        drill.broker.stop()  # the broker goes away mid-run ...
        journal = Journal(drill.root / "runs" / "journal.sqlite", "inspector")
        async with asyncio.timeout(60):  # ... while the run goes on and journals events
            while journal.last_seq() < max(seen, default=0) + 10:
                await asyncio.sleep(0.1)
        await drill.broker.start_async()
        await drill.wait_for("done", timeout_s=120)
        async with asyncio.timeout(30):
            while journal.unsent_count() or set(seen) != set(range(1, journal.last_seq() + 1)):
                await asyncio.sleep(0.1)
        journal.close()
    finally:
        listener.cancel()
        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.wait(), 30)
    deduplicated = list(dict.fromkeys(seen))
    assert deduplicated == sorted(deduplicated)  # in order; a QoS 1 repeat at most, never a gap


async def test_operator_command_line(drill: Drill) -> None:
    """`kintsugi start | status | watch | resume` as an operator types them, against the running daemon."""
    daemon = await drill.start_daemon("daemon.log")
    settings = drill.settings_file()
    recipe_file = drill.root / "run.toml"
    recipe_file.write_text(RECIPE)
    password_file = drill.root / "operator.password"
    password_file.write_text(secret("operator") + "\n")
    creds = ["--config", str(settings), "--username", "operator", "--password-file", str(password_file)]

    async def kintsugi(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kintsugi_daemon.cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        return proc.returncode or 0, out.decode(), err.decode()

    try:
        await drill.wait_for("idle")
        code, out, _ = await kintsugi("status", "--json", *creds)
        assert code == 0 and json.loads(out)["status"]["path"] == "idle"
        code, out, _ = await kintsugi("start", str(recipe_file), *creds)
        assert code == 0 and "start: accepted" in out
        code, out, _ = await kintsugi("watch", "--until-done", *creds, timeout_s=120)
        assert code == 0 and "slice" in out
        code, _, err = await kintsugi("resume", *creds)
        assert code == 1 and "resume is not allowed in state done" in err  # refused, and said why
        bad = drill.root / "bad.toml"
        bad.write_text(RECIPE.replace("slices = 3", "slices = -3"))
        code, _, err = await kintsugi("start", str(bad), *creds)
        assert code == 2 and "run.slices" in err  # checked locally; never reaches the daemon
        # No secret on a command line: --password is refused with the ways that work instead.
        code, _, err = await kintsugi("status", "--config", str(settings), "--password", "x")
        assert code == 2 and "--password-file" in err and "KINTSUGI_OPERATOR__PASSWORD" in err
        code, _, err = await kintsugi("status", "--config", str(settings), "--username", "operator")
        assert code == 1 and "as user 'operator' refused the login" in err  # never the daemon's password
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.wait(), 30)


async def test_segmentation_metrics_are_published_per_slice(drill: Drill) -> None:
    """With the shipped model: each slice's metrics reach `metrics` (QoS 0) and `slices/latest`."""
    recipe = RECIPE.replace("enabled = false", 'enabled = true\nmodel = "builtin"').replace(
        "slices = 3", "slices = 2"
    )
    daemon = await drill.start_daemon("daemon.log")
    try:
        await drill.wait_for("idle")
        metrics_seen: list[dict[str, object]] = []

        subscribed = asyncio.Event()

        def until_segmented(view: DaemonView) -> bool:
            if view.status is not None:
                subscribed.set()  # the retained status arrived: our subscription is live
            if view.metrics and view.metrics not in metrics_seen:
                metrics_seen.append(dict(view.metrics))
            latest = view.latest_slice or {}
            return latest.get("slice") == 1 and bool(latest.get("metrics"))

        watcher = asyncio.create_task(drill.operator().watch(until_segmented, 120))
        await asyncio.wait_for(subscribed.wait(), 10)  # subscribed before the run starts
        assert (await drill.operator().command("start", {"recipe": recipe}))["accepted"]
        view = await watcher
        assert view.latest_slice is not None
        assert 0.0 < float(view.latest_slice["metrics"]["porosity"]) < 1.0
        assert any("porosity" in m for m in metrics_seen)
        segmented = [e for e in view.events if e.get("type") == "kintsugi.segmented"]
        assert segmented and "cbd_coverage" in segmented[-1]["data"]
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.wait(), 30)
