"""The operator's rough edges on the daemon side (issue 12, part 4), with every part real: Mosquitto,
the simulator process, `kintsugi serve` and the `kintsugi` command line.

- `alerts/<id>` is published once per raise and once per clear; `slices/latest` once per slice, with its
  metrics;
- `kintsugi status` shows the active alert while faulted;
- `abort` and `stop` end a faulted run in one command, the instrument left safe;
- a wrong instrument token raises an alert at boot, before anyone starts a run.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiomqtt
import httpx
import pytest

from kintsugi_daemon.cli.remote import DaemonView
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.service.messages import Topics
from tests.drills.test_daemon_drills import INSTRUMENT_ID, RECIPE, SLICES, Drill, drill
from tests.support.mqtt_broker import mosquitto_available, secret

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
__all__ = ["drill"]  # the fixture, imported for this module's tests

SEGMENTED = RECIPE.replace("[segmentation]\nenabled = false", "[segmentation]\nenabled = true")
WITH_PT = RECIPE.replace("every_slices = 0", "every_slices = 1")


@dataclass
class Heard:
    """Every live message on the daemon's alert and latest-slice topics, in order."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def on(self, suffix: str) -> list[bytes]:
        topic = Topics(INSTRUMENT_ID).full(suffix)
        return [p for t, p in self.messages if t == topic]

    def alerts(self) -> dict[str, list[str]]:
        """alert id -> ["raised" | "cleared", ...] in the order they were published."""
        out: dict[str, list[str]] = {}
        prefix = Topics(INSTRUMENT_ID).full("alerts/")
        for topic, payload in self.messages:
            if topic.startswith(prefix):
                out.setdefault(topic.removeprefix(prefix), []).append("raised" if payload else "cleared")
        return out


@asynccontextmanager
async def listening(drill: Drill) -> AsyncIterator[Heard]:
    heard = Heard()
    topics = Topics(INSTRUMENT_ID)
    async with aiomqtt.Client(
        "127.0.0.1", drill.broker.port, username="monitor", password=secret("monitor")
    ) as client:
        await client.subscribe(topics.full("alerts/#"), qos=1)
        await client.subscribe(topics.full("slices/latest"), qos=1)

        async def collect() -> None:
            async for message in client.messages:
                if not message.retain:  # live publications only, not the broker's replay on subscribe
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    heard.messages.append((str(message.topic), payload))

        task = asyncio.create_task(collect())
        try:
            yield heard
        finally:
            task.cancel()


@asynccontextmanager
async def daemon_running(drill: Drill, log_name: str) -> AsyncIterator[asyncio.subprocess.Process]:
    daemon = await drill.start_daemon(log_name)
    try:
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.wait_for(daemon.wait(), 30)


async def inject(drill: Drill, fault: dict[str, object] | None) -> None:
    async with httpx.AsyncClient(
        base_url=drill.sim.url, headers={"Authorization": f"Bearer {drill.sim.token}"}
    ) as http:
        if fault is None:
            (await http.delete("/test/faults")).raise_for_status()
        else:
            (await http.post("/test/faults", json=fault)).raise_for_status()


async def kintsugi_cli(drill: Drill, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_")}
    env |= {"KINTSUGI_OPERATOR__USERNAME": "operator", "KINTSUGI_OPERATOR__PASSWORD": secret("operator")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kintsugi_daemon.cli",
        *args,
        "--config",
        str(drill.settings_file()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_latest_slice_once_per_slice_with_metrics(drill: Drill) -> None:
    async with daemon_running(drill, "daemon.log"), listening(drill) as heard:
        await drill.wait_for("idle")
        assert (await drill.operator().command("start", {"recipe": SEGMENTED}))["accepted"]
        await drill.wait_for("done", timeout_s=120)
        view = await drill.operator().snapshot()  # a round trip through the broker: earlier publishes are in
    # One version: the description topic says what the package metadata says.
    assert (view.description or {}).get("version") == importlib.metadata.version("kintsugi-daemon")
    latest = [json.loads(p) for p in heard.on("slices/latest")]
    assert [s["slice"] for s in latest] == list(range(SLICES))  # once each, in order
    assert all(s["metrics"].get("porosity") is not None for s in latest)


@pytest.mark.parametrize("verb", ["abort", "stop"])
async def test_faulted_run_ends_in_one_command_and_alerts_are_published_once(drill: Drill, verb: str) -> None:
    async with daemon_running(drill, "daemon.log"), listening(drill) as heard:
        await drill.wait_for("idle")
        await inject(drill, {"kind": "gis_heater_failure", "verb": "any"})
        assert (await drill.operator().command("start", {"recipe": WITH_PT}))["accepted"]
        await drill.wait_for("faulted")
        code, out, err = await kintsugi_cli(drill, "status", "--json")
        assert code == 0, err
        assert "fault" in json.loads(out)["alerts"]  # the operator sees why it stopped
        await inject(drill, None)
        code, out, err = await kintsugi_cli(drill, verb)
        assert code == 0 and f"{verb}: accepted" in out, (out, err)
        ended = await drill.operator().watch(
            lambda v: (v.status or {}).get("path") in ("done", "idle") and not v.alerts, timeout_s=60
        )
        assert ended.status is not None and ended.status["path"] in ("done", "idle")
        await drill.operator().snapshot()
    async with HttpDualBeam(drill.sim.url, token=drill.sim.token) as scope:
        state = await scope.state()
    assert not state.ion_beam_on and not state.electron_beam_on and state.patterning == "idle"
    assert state.gis.inserted is False
    journal_run = json.loads(next((drill.root / "runs").glob("*/run.json")).read_text())
    assert journal_run["state"] in ("aborted", "stopped")
    assert heard.alerts() == {"fault": ["raised", "cleared"]}  # exactly once each


async def test_wrong_instrument_token_is_an_alert_at_boot(
    drill: Drill, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found at boot, not at 6 pm when the run is started: a retained alert names the problem."""
    monkeypatch.setenv("KINTSUGI_INSTRUMENT__TOKEN", '"wrong-token"')
    async with daemon_running(drill, "daemon.log"):
        view = await drill.operator().watch(lambda v: "instrument" in v.alerts, timeout_s=30)
        alert = view.alerts["instrument"]
        assert alert["severity"] == "critical"
        assert drill.sim.url in alert["message"] and "token" in alert["message"]
        assert (view.status or {}).get("path") == "idle"  # nothing started, nothing touched


async def test_eta_ignores_a_pause_and_says_how_sure_it_is(drill: Drill) -> None:
    """An operator's pause inside slice 1 is not the instrument's pace: the ETA per remaining slice
    after it stays where slice 0 put it (the mean of periods jumped by the pause's length)."""
    async with daemon_running(drill, "daemon.log"):
        await drill.wait_for("idle")
        progress: dict[int, dict[str, object]] = {}

        def record(view: DaemonView) -> bool:
            p = view.progress or {}
            if isinstance(p.get("slice"), int):
                progress[p["slice"]] = p  # the last progress of each slice count
            return (view.status or {}).get("path") == "done"

        watcher = asyncio.create_task(drill.operator().watch(record, timeout_s=120))
        assert (await drill.operator().command("start", {"recipe": RECIPE}))["accepted"]
        await drill.operator().watch(
            lambda v: (v.status or {}).get("path") == "running.mill" and (v.progress or {}).get("slice") == 1,
            timeout_s=60,
        )
        assert (await drill.operator().command("pause"))["accepted"]
        await drill.wait_for("paused")
        await asyncio.sleep(4.0)  # the operator looks at the instrument for a while
        assert (await drill.operator().command("resume"))["accepted"]
        await watcher
    after_0, after_1 = progress[1], progress[2]
    pace_0 = float(after_0["eta_s"]) / (SLICES - 1)  # type: ignore[arg-type]
    pace_1 = float(after_1["eta_s"]) / (SLICES - 2)  # type: ignore[arg-type]
    assert pace_1 < 1.5 * pace_0, (after_0, after_1)
    assert isinstance(after_1["eta_uncertainty_s"], float) and float(after_1["eta_uncertainty_s"]) > 0
