"""Start `kintsugi-sim serve` (or any instrument API server) as its own process and wait for its ready line.

The daemon never imports the simulator: it starts it like any other program and talks to it over the
instrument API, exactly as it would talk to the AutoScript bridge. The child dies with its parent: it
gets SIGTERM when the parent dies (Linux), and it exits when its stdin (a pipe we hold) reaches EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["SimulatorProcess", "start_server", "start_simulator"]

READY_TIMEOUT_S = 300.0  # the first start builds the specimen (cached afterwards)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


async def _discard(stream: asyncio.StreamReader) -> None:
    """Read and drop the child's further stdout, so a chatty child never blocks on a full pipe."""
    while await stream.read(65536):
        pass


@dataclass
class SimulatorProcess:
    url: str
    token: str
    process: asyncio.subprocess.Process
    ready: dict[str, object]
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._drain
        if self.process.stdin is not None:
            self.process.stdin.close()
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
    command = [sys.executable, "-m", "simulator.cli", "serve", "--port", "0", "--exit-on-stdin-eof", *args]
    env = dict(os.environ, KINTSUGI_SIM_TOKEN=token)
    async with start_server(
        command, name="kintsugi-sim", token=token, env=env, log_path=log_path, ready_timeout_s=ready_timeout_s
    ) as sim:
        yield sim


@asynccontextmanager
async def start_server(
    command: Sequence[str],
    *,
    name: str,
    token: str,
    env: dict[str, str],
    log_path: Path | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> AsyncIterator[SimulatorProcess]:
    """Start an instrument API server (`command`, which prints a JSON ready line with its `url` on stdout
    and exits on stdin EOF) and stop it on exit. Serves the simulator and the bridge alike."""
    log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log if log is not None else asyncio.subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    finally:
        if log is not None:
            log.close()  # the child has its own copy
    sim: SimulatorProcess | None = None
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"{name} did not become ready within {ready_timeout_s:g} s") from None
        if not line:
            code = await proc.wait()
            raise RuntimeError(
                f"{name} exited with status {code} before it was ready"
                + (f"; see {log_path}" if log_path else "")
            )
        try:
            ready = json.loads(line)
            url = str(ready["url"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{name} printed no ready line: {line[:200]!r}") from exc
        drain = asyncio.create_task(_discard(proc.stdout))
        sim = SimulatorProcess(url=url, token=token, process=proc, ready=ready, _drain=drain)
        yield sim
    finally:
        if sim is not None:
            await sim.stop()
        else:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
