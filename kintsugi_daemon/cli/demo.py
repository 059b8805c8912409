"""`kintsugi demo`: the main job (the harness itself lives in `kintsugi_daemon.demo`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from kintsugi_daemon.demo.harness import DemoOptions, run_demo

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "demo", help="broker, simulator and daemon together: one serial-sectioning run, then a summary"
    )
    d.add_argument("--slices", type=int, default=DemoOptions.slices)
    d.add_argument(
        "--time-scale",
        type=float,
        default=DemoOptions.time_scale,
        help="real seconds per simulated instrument second (0 = instant)",
    )
    d.add_argument("--out", type=Path, default=DemoOptions.out)
    d.add_argument(
        "--broker",
        default=None,
        metavar="mqtt://[USER@]HOST:PORT",
        help="use this broker instead of starting one; USER is the demo's operator, its password in "
        "$KINTSUGI_DEMO_BROKER_PASSWORD (never in the URL); the daemon's identity comes from "
        "KINTSUGI_MQTT__USERNAME/PASSWORD, and its user name is the run's instrument id",
    )
    d.add_argument("--width-px", type=int, default=DemoOptions.width_px)
    d.add_argument("--height-px", type=int, default=DemoOptions.height_px)
    d.add_argument("--seed", type=int, default=DemoOptions.seed)
    d.add_argument("--preset", choices=["96:2:2", "94:3:3", "90:5:5"], default=DemoOptions.preset)
    d.add_argument(
        "--bridge",
        choices=["demo"],
        default=None,
        help="run through `kintsugi bridge --backend demo` (OpenFIBSEM's Demo microscope; the [bridge] "
        "extra) instead of the simulator: noise images, segmentation off",
    )
    d.add_argument(
        "--policy",
        choices=["adaptive", "fixed"],
        default=DemoOptions.policy,
        help="adaptive (default): the next slice adapts to what the last ones showed; fixed: Pt every slice",
    )
    d.add_argument("--embedded-broker", action="store_true", help=argparse.SUPPRESS)
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
        broker=args.broker,
        embedded_broker=args.embedded_broker,
        bridge=args.bridge,
        policy=args.policy,
    )
    try:
        return asyncio.run(run_demo(opts))
    except asyncio.CancelledError:
        print("kintsugi demo: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
