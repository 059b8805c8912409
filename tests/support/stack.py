"""The daemon and the page as real processes beside a test's broker and simulator: `kintsugi serve` and
`kintsugi web` started from a settings file the test writes, stopped with SIGTERM (then SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from tests.support.mqtt_broker import Broker, secret

__all__ = ["CHROMIUM", "Stack", "chromium_path", "process"]

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """Debian's chromium (Playwright drives it; no browser download exists on these machines)."""
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


def _toml_str(value: object) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Stack:
    broker: Broker
    sim: SimulatorProcess
    root: Path
    instrument_id: str = "web-01"

    def settings_file(self, extra: str = "") -> Path:
        path = self.root / "settings.toml"
        path.write_text(
            f"""
instrument_id = "{self.instrument_id}"
data_root = {_toml_str(self.root / "runs")}

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
username = "{self.instrument_id}"
password = "{secret(self.instrument_id)}"
keepalive_s = 5

[instrument]
url = "{self.sim.url}"
token = "{self.sim.token}"
deadline_scale = 0.2

[web]
port = 0
username = "monitor"
password = "{secret("monitor")}"

[logging]
level = "info"
{extra}
"""
        )
        return path

    def operator(self, user: str = "operator") -> Operator:
        mqtt = MqttSettings(host="127.0.0.1", port=self.broker.port, username=user, password=secret(user))
        return Operator(mqtt, self.instrument_id)

    async def wait_path(self, path: str, timeout_s: float = 60.0) -> DaemonView:
        """Until the daemon's retained status is online at `path` (a state such as `idle` or `done`)."""
        return await self.operator("monitor").watch(
            lambda v: bool(v.status and v.status.get("state") == "online" and v.status.get("path") == path),
            timeout_s,
        )


@contextlib.asynccontextmanager
async def process(
    args: list[str], log: Path, ready: str | None = None, timeout_s: float = 60.0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, re.Match[str] | None]]:
    """`python -m kintsugi_daemon.cli ARGS` with its output in `log`; when `ready` (a regex) is given,
    waits for the first line that matches it and yields the match."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_") or k == "KINTSUGI_SIM_CACHE"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kintsugi_daemon.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert proc.stdout is not None
    out = log.open("ab")
    match: re.Match[str] | None = None
    pumping: asyncio.Task[re.Match[str] | None] | None = None
    pattern = re.compile(ready) if ready else None

    async def pump(until_ready: bool) -> re.Match[str] | None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return None
            out.write(line)
            out.flush()
            if until_ready and pattern is not None:
                found = pattern.search(line.decode(errors="replace"))
                if found:
                    return found

    try:
        if pattern is not None:
            async with asyncio.timeout(timeout_s):
                match = await pump(True)
            if match is None:
                raise RuntimeError(f"{args[0]} exited before it was ready:\n{log.read_text()[-3000:]}")
        pumping = asyncio.create_task(pump(False))
        yield proc, match
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if pumping is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pumping, 5)
        out.close()
