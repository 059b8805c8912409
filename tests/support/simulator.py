"""A real `kintsugi-sim serve` process per test, reached through the real client (fixtures imported by the
conftest of each kind of test that needs one)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

import pytest

from kintsugi_daemon.demo.simulator_process import SimulatorProcess, start_simulator
from kintsugi_daemon.drivers.http_client import HttpDualBeam

# Small field of view so each simulator starts in about a second; the specimen is cached per session.
SMALL_SIM_ARGS = ("--slices", "12", "--width-px", "256", "--height-px", "192", "--seed", "3")


def auth(sim: SimulatorProcess) -> dict[str, str]:
    """Headers that carry the simulator's token."""
    return {"Authorization": f"Bearer {sim.token}"}


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("KINTSUGI_SIM_CACHE")
    return Path(shared) if shared else tmp_path_factory.mktemp("sim-cache")


class SimStarter(Protocol):
    def __call__(self, *extra: str) -> AbstractAsyncContextManager[SimulatorProcess]: ...


@pytest.fixture
def start_sim(sim_cache: Path, tmp_path: Path) -> SimStarter:
    """Start a simulator process with the small test specimen plus `extra` flags."""

    def start(*extra: str) -> AbstractAsyncContextManager[SimulatorProcess]:
        args: Sequence[str] = (*SMALL_SIM_ARGS, "--cache-dir", str(sim_cache), *extra)
        return start_simulator(args, log_path=tmp_path / "simulator.log", ready_timeout_s=120)

    return start


@pytest.fixture
async def sim(start_sim: SimStarter) -> AsyncIterator[SimulatorProcess]:
    async with start_sim("--time-scale", "0", "--test-endpoints") as process:
        yield process


@pytest.fixture
async def scope(sim: SimulatorProcess) -> AsyncIterator[HttpDualBeam]:
    async with HttpDualBeam(sim.url, token=sim.token, deadline_scale=0.05) as client:
        yield client
