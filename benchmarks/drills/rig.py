"""One rig per drill: a private Mosquitto (per-instrument identities), a simulator process with its test
endpoints, and `kintsugi serve` started and killed as its own process, driven over MQTT like an operator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.broker import Access, LocalBroker
from kintsugi_daemon.demo.simulator_process import SimulatorProcess, start_simulator

__all__ = ["INSTRUMENT_ID", "Rig", "drill_recipe", "rig"]

INSTRUMENT_ID = "drill-01"
SIM_ARGS = ("--slices", "12", "--width-px", "256", "--height-px", "192", "--seed", "3", "--test-endpoints")


def drill_recipe(slices: int, *, pt_every: int = 0, min_free_disk_bytes: int = 0) -> str:
    """A small run: at 1 nA a 10 x 8 um slice mills in ~6 s of instrument time."""
    return f"""
[run]
name = "drill"
slices = {slices}
slice_thickness_m = 40e-9

[roi]
width_m = 10e-6
height_m = 8e-6

[pt]
every_slices = {pt_every}
thickness_m = 20e-9

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
min_free_disk_bytes = {min_free_disk_bytes}
settle_s = 0.5
poll_s = 0.2
"""


@dataclass
class Rig:
    root: Path
    broker: LocalBroker
    sim: SimulatorProcess
    data_root: Path

    def settings_file(self, extra: str = "") -> Path:
        user, password = self.broker.credentials(INSTRUMENT_ID)
        path = self.root / "daemon.toml"
        path.write_text(f"""
instrument_id = "{INSTRUMENT_ID}"
data_root = "{self.data_root}"
{extra}

[mqtt]
host = "{self.broker.host}"
port = {self.broker.port}
username = "{user}"
password = "{password}"
keepalive_s = 5

[instrument]
url = "{self.sim.url}"
token = "{self.sim.token}"
deadline_scale = 0.2

[logging]
level = "info"
""")
        return path

    def mqtt(self, user: str) -> MqttSettings:
        name, password = self.broker.credentials(user)
        return MqttSettings(host=self.broker.host, port=self.broker.port, username=name, password=password)

    def operator(self) -> Operator:
        return Operator(self.mqtt("operator"), INSTRUMENT_ID)

    async def start_daemon(
        self, log_name: str, env: Mapping[str, str] | None = None, extra_settings: str = ""
    ) -> asyncio.subprocess.Process:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - handed to the child process
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kintsugi_daemon.cli",
                "serve",
                "--config",
                str(self.settings_file(extra_settings)),
                stdout=log,
                stderr=log,
                env={**os.environ, "KINTSUGI_LOGGING__JSON_OUTPUT": "true", **(env or {})},
            )
        finally:
            log.close()

    async def wait_for(
        self, path: str | None, *, state: str = "online", timeout_s: float = 60.0
    ) -> DaemonView:
        """Until the retained status shows `state` (and the machine at `path`, when given)."""

        def done(view: DaemonView) -> bool:
            status = view.status or {}
            return status.get("state") == state and (path is None or status.get("path") == path)

        return await self.operator().watch(done, timeout_s)

    async def sim_get(self, path: str) -> dict[str, Any]:
        async with httpx.AsyncClient(
            base_url=self.sim.url, headers={"Authorization": f"Bearer {self.sim.token}"}, timeout=10
        ) as http:
            resp = await http.get(path)
            resp.raise_for_status()
            data: dict[str, Any] = resp.json()
            return data


@asynccontextmanager
async def rig(
    root: Path, *, time_scale: float, data_root: Path | None = None, access: Access | None = None
) -> AsyncIterator[Rig]:
    """Broker and simulator for one drill (the simulator's specimen comes from $KINTSUGI_SIM_CACHE)."""
    root.mkdir(parents=True, exist_ok=True)
    broker = LocalBroker(
        root / "broker", embedded=False, instruments=[INSTRUMENT_ID], access=access, persistence=True
    )
    await broker.start_async()
    try:
        cache = os.environ.get("KINTSUGI_SIM_CACHE")
        args = [*SIM_ARGS, "--time-scale", repr(time_scale), *(["--cache-dir", cache] if cache else [])]
        async with start_simulator(args, log_path=root / "simulator.log", ready_timeout_s=120) as sim:
            yield Rig(root, broker, sim, data_root or root / "runs")
    finally:
        broker.kill()


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
