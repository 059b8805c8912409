"""`kintsugi demo`: the main job until the daemon exists.

Starts the simulator as its own process, drives a short fixed-schedule kintsugi cycle through the HTTP
client (Pt, mill, polish, two-detector image per slice), writes every image atomically into a run folder
with a manifest, shows progress, and ends with a summary and the folder's path.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kintsugi_daemon.atomic import write_json_atomic, write_tiff_atomic
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.scripted import CyclePlan, run_cycle
from kintsugi_daemon.sim_process import start_simulator

__all__ = ["DemoOptions", "register", "run_demo"]


@dataclass(frozen=True)
class DemoOptions:
    slices: int = 24
    time_scale: float = 0.01
    out: Path = Path("demo-output")
    width_px: int = 1024
    height_px: int = 768
    pixel_size_m: float = 40e-9
    seed: int = 0
    preset: str = "94:3:3"

    def __post_init__(self) -> None:
        if not 1 <= self.slices <= 2000:
            raise ValueError(f"--slices must be between 1 and 2000, got {self.slices}")
        if not 0 <= self.time_scale <= 10:
            raise ValueError(f"--time-scale must be between 0 and 10, got {self.time_scale}")


def _progress(done: int, total: int, face_m: float, width: int = 30) -> None:
    """A redrawn bar on a terminal; one line per slice in a log."""
    filled = int(width * done / total)
    line = f"[{'#' * filled}{'-' * (width - filled)}] slice {done}/{total}  face {face_m * 1e9:7.1f} nm"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def run_demo(opts: DemoOptions) -> Path:
    run_id = datetime.now(UTC).strftime("demo-%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
    run_dir = opts.out / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    plan = CyclePlan(
        slices=opts.slices, width_px=opts.width_px, height_px=opts.height_px, pixel_size_m=opts.pixel_size_m
    )
    sim_args = [
        "--time-scale",
        repr(opts.time_scale),
        "--slices",
        str(opts.slices),
        "--seed",
        str(opts.seed),
        "--preset",
        opts.preset,
        "--width-px",
        str(opts.width_px),
        "--height-px",
        str(opts.height_px),
        "--pixel-size-m",
        repr(opts.pixel_size_m),
    ]
    print(
        "kintsugi demo: starting the simulator (first start builds the specimen; cached after) ...",
        file=sys.stderr,
        flush=True,
    )
    manifest: dict[str, Any] = {
        "run_id": run_id,
        "plan": {k: v for k, v in vars(plan).items() if k != "area"},
        "slices": [],
    }
    t0 = time.monotonic()
    async with start_simulator(sim_args, log_path=run_dir / "simulator.log") as sim:
        print(
            f"kintsugi demo: simulator ready at {sim.url} (specimen {sim.ready['specimen_shape']})",
            file=sys.stderr,
            flush=True,
        )
        async with HttpDualBeam(sim.url, token=sim.token, deadline_scale=max(opts.time_scale, 0.01)) as scope:
            ident = await scope.identity()
            manifest["instrument"] = ident.model_dump()
            async for outcome in run_cycle(scope, plan):
                entry: dict[str, Any] = {
                    "index": outcome.index,
                    "images": {},
                    "face_position_m": outcome.polish.face_position_m,
                    "removed_m": outcome.mill.removed_m,
                    "pt_deposited": outcome.deposit is not None,
                }
                meta = outcome.acquisition.metadata.model_dump(mode="json")
                for name, image in outcome.acquisition.images.items():
                    path = run_dir / f"{outcome.index:04d}_{name}.tif"
                    write_tiff_atomic(path, image, {"detector": name, **meta})
                    entry["images"][name] = path.name
                    entry.setdefault("mean_grey", {})[name] = round(float(np.mean(image)), 1)
                manifest["slices"].append(entry)
                write_json_atomic(run_dir / "run.json", manifest)  # rewritten whole after every slice
                _progress(outcome.index + 1, opts.slices, outcome.polish.face_position_m)
            state = await scope.state()
    elapsed = time.monotonic() - t0
    manifest["summary"] = {
        "slices": len(manifest["slices"]),
        "face_position_m": state.face_position_m,
        "instrument_time_s": state.instrument_time_s,
        "wall_time_s": round(elapsed, 2),
    }
    write_json_atomic(run_dir / "run.json", manifest)
    _print_summary(manifest, run_dir)
    return run_dir


def _print_summary(manifest: dict[str, Any], run_dir: Path) -> None:
    s = manifest["summary"]
    slices = manifest["slices"]
    removed = np.array([e["removed_m"] for e in slices]) * 1e9
    print("\nkintsugi demo summary")
    print(f"  instrument        {manifest['instrument']['model']} ({manifest['instrument']['serial']})")
    print(f"  slices            {s['slices']}")
    print(
        f"  milled depth      {s['face_position_m'] * 1e6:.3f} um (slice {removed.mean():.1f} +- "
        f"{removed.std():.1f} nm)"
    )
    print(
        f"  instrument time   {s['instrument_time_s'] / 60:.1f} min simulated, {s['wall_time_s']:.1f} s wall"
    )
    for det in slices[0]["images"]:
        greys = [e["mean_grey"][det] for e in slices]
        spread = f"min {min(greys):.0f}, max {max(greys):.0f}"
        print(f"  {det.upper():4s} mean grey     {np.mean(greys):.0f} ({spread})")
    print(f"  files             {sum(len(e['images']) for e in slices)} TIFFs + run.json")
    print(f"  output folder     {run_dir.resolve()}")
    sys.stdout.flush()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("demo", help="a short serial-sectioning run against the simulator")
    d.add_argument("--slices", type=int, default=DemoOptions.slices)
    d.add_argument(
        "--time-scale",
        type=float,
        default=DemoOptions.time_scale,
        help="real seconds per simulated instrument second (0 = instant)",
    )
    d.add_argument("--out", type=Path, default=DemoOptions.out)
    d.add_argument("--width-px", type=int, default=DemoOptions.width_px)
    d.add_argument("--height-px", type=int, default=DemoOptions.height_px)
    d.add_argument("--seed", type=int, default=DemoOptions.seed)
    d.add_argument("--preset", choices=["96:2:2", "94:3:3", "90:5:5"], default=DemoOptions.preset)
    d.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    opts = DemoOptions(
        slices=args.slices,
        time_scale=args.time_scale,
        out=args.out,
        width_px=args.width_px,
        height_px=args.height_px,
        seed=args.seed,
        preset=args.preset,
    )
    asyncio.run(run_demo(opts))
    return 0
