"""Start `kintsugi-sim serve` as its own process and wait for its ready line (demo and tests).

The daemon never imports the simulator: it starts it like any other program and talks to it over the
instrument API, exactly as it would talk to the AutoScript bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SimulatorProcess", "start_simulator"]

READY_TIMEOUT_S = 300.0  # the first start builds the specimen (cached afterwards)


@dataclass
class SimulatorProcess:
    url: str
    token: str
    process: asyncio.subprocess.Process
    ready: dict[str, object]

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode or 0


@asynccontextmanager
async def start_simulator(
    args: Sequence[str] = (),
    *,
    token: str | None = None,
    log_path: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> AsyncIterator[SimulatorProcess]:
    """`args` are extra `kintsugi-sim serve` flags; the port is chosen free and the token random."""
    token = token or secrets.token_urlsafe(24)
    env = dict(os.environ, KINTSUGI_SIM_TOKEN=token)
    stderr = open(log_path, "ab") if log_path else asyncio.subprocess.DEVNULL  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulator.cli",
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=env,
    )
    sim: SimulatorProcess | None = None
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"kintsugi-sim did not become ready within {ready_timeout_s:g} s") from None
        if not line:
            code = await proc.wait()
            raise RuntimeError(
                f"kintsugi-sim exited with status {code} before it was ready"
                + (f"; see {log_path}" if log_path else "")
            )
        ready = json.loads(line)
        sim = SimulatorProcess(url=str(ready["url"]), token=token, process=proc, ready=ready)
        yield sim
    finally:
        if sim is not None:
            await sim.stop()
        elif proc.returncode is None:
            proc.kill()
            await proc.wait()
        if log_path:
            stderr.close()  # type: ignore[union-attr]
