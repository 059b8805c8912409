"""Start `kintsugi bridge` as its own process (the demo's `--bridge`, the bridge tests), like the simulator.

The token travels in a private file (`--token-file`), never on the command line. The Demo backend's
artificial delays are switched off (`FIBSEM_SIM_NO_DELAY=1`) unless `delays` is set: the demo's pace is
the daemon's, and a stop test wants a mill that takes its time.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from kintsugi_daemon.demo.simulator_process import READY_TIMEOUT_S, SimulatorProcess, start_server

__all__ = ["start_bridge"]


@asynccontextmanager
async def start_bridge(
    backend: str,
    workdir: Path,
    *,
    delays: bool = False,
    log_path: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> AsyncIterator[SimulatorProcess]:
    """`workdir` holds the token file, the bridge's state file and OpenFIBSEM's logs."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = workdir / "bridge.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    command = [
        *(sys.executable, "-m", "kintsugi_daemon.cli", "bridge", "--backend", backend, "--port", "0"),
        *("--token-file", str(token_file), "--state-file", str(workdir / "bridge-state.json")),
        *("--log-dir", str(workdir / "openfibsem-logs"), "--gis-warmup-s", "0", "--exit-on-stdin-eof"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "FIBSEM_SIM_NO_DELAY"}
    if not delays:
        env["FIBSEM_SIM_NO_DELAY"] = "1"
    async with start_server(
        command,
        name="kintsugi bridge",
        token=token,
        env=env,
        log_path=log_path,
        ready_timeout_s=ready_timeout_s,
    ) as bridge:
        yield bridge
