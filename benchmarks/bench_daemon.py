"""Daemon overhead per slice and resident-memory growth over a long run (issue 3 figures).

The daemon's controller (journal, run storage, state machine) drives a real simulator process at time
scale 0. Overhead per slice = wall time of the slice minus the time spent inside instrument calls
(measured around each call), i.e. what the daemon itself adds. Memory: RSS of this process (the daemon
side) after a warm-up and at the end.

    python -m benchmarks.bench_daemon [--slices 60] [--width-px 1024 --height-px 768]
    python -m benchmarks.bench_daemon --memory [--slices 500] [--width-px 512 --height-px 384]
    python -m benchmarks.bench_daemon --segmentation [--instrument-s 5] [--slices 20]   (1536 x 1024)

With --segmentation the shipped model segments every slice and the simulator runs at the time scale that
makes one slice about `--instrument-s` seconds of instrument work; the figure is the instrument's idle
fraction, the share of the wall time in which no instrument call was in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from kintsugi_daemon.config import DaemonSettings, parse_recipe
from kintsugi_daemon.demo.simulator_process import start_simulator
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.estimate import estimate_run
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.service.wiring import configure_logging
from kintsugi_daemon.states.controller import Controller

RECIPE = """
[run]
name = "bench"
slices = {slices}
slice_thickness_m = 40e-9
[roi]
width_m = 40e-6
height_m = 30e-6
[pt]
every_slices = 1
[imaging]
detectors = ["cbs", "tld"]
width_px = {width}
height_px = {height}
pixel_size_m = 4.05e-8
[segmentation]
enabled = {segmentation}
[guards]
min_free_disk_bytes = 0
"""


class TimedInstrument:
    """The real client, with the wall time spent inside each instrument call added up per slice."""

    def __init__(self, inner: HttpDualBeam) -> None:
        self.inner = inner
        self.inside_s = 0.0

    def __getattr__(self, verb: str) -> Any:
        method = getattr(self.inner, verb)

        async def call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.inside_s += time.perf_counter() - t0

        return call


async def run(slices: int, width: int, height: int, memory: bool, instrument_s: float | None = None) -> None:
    segmentation = instrument_s is not None
    recipe = RECIPE.format(slices=slices, width=width, height=height, segmentation=str(segmentation).lower())
    time_scale = 0.0
    if instrument_s is not None:
        time_scale = instrument_s / estimate_run(parse_recipe(recipe)).seconds_per_slice
    with tempfile.TemporaryDirectory() as tmp:
        sim_args = [
            "--time-scale",
            repr(time_scale),
            "--slices",
            str(slices),
            "--width-px",
            str(width),
            "--height-px",
            str(height),
            "--pixel-size-m",
            "4.05e-8",
        ]
        async with start_simulator(sim_args, log_path=Path(tmp) / "sim.log") as sim:
            settings = DaemonSettings(data_root=Path(tmp) / "runs")
            settings.data_root.mkdir()
            journal = Journal(settings.journal_file, "bench")
            client = HttpDualBeam(sim.url, token=sim.token, deadline_scale=0.05)
            timed = TimedInstrument(client)
            controller = Controller(instrument=timed, journal=journal, settings=settings)
            await controller.boot()
            proc = psutil.Process()
            overheads: list[float] = []
            rss: dict[int, float] = {}
            last = (time.perf_counter(), 0.0, 0)

            def on_change() -> None:
                nonlocal last
                run_ = controller.run
                done = run_.next_slice if run_ else slices
                if done > last[2]:
                    now = time.perf_counter()
                    overheads.append((now - last[0]) - (timed.inside_s - last[1]))
                    last = (now, timed.inside_s, done)
                    if memory and done in (50, slices):
                        rss[done] = proc.memory_info().rss / 2**20

            controller.on_change = on_change
            t0 = time.perf_counter()
            await controller.command("start", {"recipe": recipe})
            await controller.wait_run()
            wall = time.perf_counter() - t0
            await controller.close()
            await client.aclose()
            journal.close()

    if segmentation:
        idle = (wall - timed.inside_s) / wall
        print(f"instrument idle fraction with segmentation on ({width}x{height}, 2 detectors, shipped model)")
        print(
            f"  time scale {time_scale:.4f} (about {instrument_s:g} s of instrument work per slice), "
            f"{slices} slices"
        )
        print(
            f"  wall {wall:.1f} s, inside instrument calls {timed.inside_s:.1f} s, slice period "
            f"{wall / slices:.2f} s"
        )
        print(f"  idle {idle:.1%}   (target <= 5 %): {'PASS' if idle <= 0.05 else 'FAIL'}")
        return
    overheads = overheads[1:]  # the first slice carries preflight and connection set-up
    med = statistics.median(overheads) * 1e3
    p90 = sorted(overheads)[int(0.9 * (len(overheads) - 1))] * 1e3
    print(f"daemon overhead per slice ({width}x{height}, 2 detectors, time scale 0, segmentation off)")
    print(f"  slices {len(overheads) + 1}, wall {wall:.1f} s, instrument calls {timed.inside_s:.1f} s")
    print(
        f"  overhead median {med:.1f} ms, p90 {p90:.1f} ms   (target median <= 50 ms): "
        f"{'PASS' if med <= 50 else 'FAIL'}"
    )
    if memory and len(rss) == 2:
        growth = rss[slices] - rss[50]
        print(
            f"  RSS after 50 slices {rss[50]:.1f} MB, after {slices}: {rss[slices]:.1f} MB, "
            f"growth {growth:+.1f} MB   (target <= 20 MB): {'PASS' if growth <= 20 else 'FAIL'}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=None)
    p.add_argument("--width-px", type=int, default=None)
    p.add_argument("--height-px", type=int, default=None)
    p.add_argument("--memory", action="store_true", help="the 500-slice memory-growth run")
    p.add_argument(
        "--segmentation", action="store_true", help="the instrument idle fraction with segmentation"
    )
    p.add_argument(
        "--instrument-s", type=float, default=5.0, help="instrument work per slice (--segmentation)"
    )
    a = p.parse_args()
    slices = a.slices or (500 if a.memory else 20 if a.segmentation else 60)
    width = a.width_px or (512 if a.memory else 1536 if a.segmentation else 1024)
    height = a.height_px or (384 if a.memory else 1024 if a.segmentation else 768)
    configure_logging("warning", json_output=False)  # per-transition logs would be the benchmark's output
    asyncio.run(run(slices, width, height, a.memory, a.instrument_s if a.segmentation else None))


if __name__ == "__main__":
    main()
