"""`kintsugi`: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from kintsugi_daemon.demo import DemoOptions, run_demo
from kintsugi_daemon.drivers.base import InstrumentError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kintsugi", description="unattended kintsugi serial sectioning")
    sub = p.add_subparsers(dest="command", required=True)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
    except ValueError as exc:
        print(f"kintsugi: error: {exc}", file=sys.stderr)
        return 2
    except (InstrumentError, RuntimeError) as exc:
        print(f"kintsugi: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
