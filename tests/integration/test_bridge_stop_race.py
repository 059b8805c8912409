"""A stop that lands after the bridge's last check but before OpenFIBSEM's `run_milling` starts stops it.

In-process over OpenFIBSEM's real DemoMicroscope (delays on: a pattern takes 5 s). The only hook holds the
start until the first stop has been sent, so the race is hit every time instead of by luck.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kintsugi_daemon.drivers.base import Aborted, MillRequest, Rectangle
from kintsugi_daemon.drivers.bridge.backends import open_backend

pytest.importorskip(
    "fibsem", reason="OpenFIBSEM (the [bridge] extra) is not installed: pip install -e '.[dev,bridge]'"
)

MILL = MillRequest(
    pattern="cleaning_cross_section",
    area=Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=20e-6, height_m=10e-6),
    slice_thickness_m=40e-9,
    current_a=15e-9,
    species="xe",
)


@pytest.fixture
def demo_delays() -> Iterator[None]:
    saved = os.environ.pop("FIBSEM_SIM_NO_DELAY", None)
    yield
    if saved is not None:
        os.environ["FIBSEM_SIM_NO_DELAY"] = saved


async def test_a_stop_just_before_the_start_stops_the_pattern_once_it_runs(
    tmp_path: Path, demo_delays: None
) -> None:
    beam = open_backend("demo", microscope_host=None, log_dir=tmp_path)
    m: Any = beam.m
    first_stop_sent = threading.Event()
    original_stop, original_run = m.stop_milling, m.run_milling

    def stop_milling() -> None:
        original_stop()
        first_stop_sent.set()

    def run_milling(*args: Any, **kwargs: Any) -> None:
        # Past the bridge's last check, before the pattern starts: the first stop lands here.
        assert first_stop_sent.wait(5.0)
        original_run(*args, **kwargs)

    m.stop_milling, m.run_milling = stop_milling, run_milling
    mill = asyncio.create_task(beam.mill(MILL))
    async with asyncio.timeout(5.0):
        while beam._busy != "mill":
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop = asyncio.create_task(beam.stop())
    with pytest.raises(Aborted):
        await asyncio.wait_for(mill, 10.0)
    assert loop.time() - t0 < 3.5  # stopped soon after it started, not after the pattern's 5 s
    assert (await stop).stopped == "mill"
    assert (await beam.state()).face_position_m == 0.0
