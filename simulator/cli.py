"""`kintsugi-sim`: serve the simulated DualBeam over the instrument API, or export a training dataset."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from kintsugi_daemon.config import read_secret
from kintsugi_daemon.drivers.base import InvalidRequest
from kintsugi_daemon.drivers.server import build_app, check_bind, listen_socket, serve
from simulator.dataset import export_dataset
from simulator.factory import RunSize, make_simulator
from simulator.faults import parse_fault_flag
from simulator.inspection_api import test_router
from simulator.instrument import check_fault_applicable
from simulator.specimen import PRESETS

__all__ = ["main"]

TOKEN_ENV = "KINTSUGI_SIM_TOKEN"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kintsugi-sim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a simulated Helios Hydra over the instrument API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8780, help="0 picks a free port (printed on the ready line)")
    s.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token (or ${TOKEN_ENV}); a token is required beyond loopback",
    )
    # Refused with a reason: a token on a command line is readable by every local user (ps).
    s.add_argument("--token", default=None, help=argparse.SUPPRESS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", choices=sorted(PRESETS), default="96:2:2")
    s.add_argument("--geometry", choices=["cross_section", "planar"], default="cross_section")
    s.add_argument(
        "--time-scale",
        type=_non_negative_float,
        default=1.0,
        help="real seconds per simulated second (0 = instant, 0.01 = 100x faster)",
    )
    s.add_argument("--slices", type=_positive_int, default=200, help="slices the specimen must allow")
    s.add_argument("--width-px", type=_positive_int, default=1536)
    s.add_argument("--height-px", type=_positive_int, default=1024)
    s.add_argument("--pixel-size-m", type=_positive_float, default=40e-9)
    s.add_argument("--slice-thickness-m", type=_positive_float, default=40e-9)
    s.add_argument("--cache-dir", type=Path, default=None)
    s.add_argument("--test-endpoints", action="store_true", help="serve /test/* (ground truth, faults)")
    s.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[@VERB][:AFTER][/SECONDS]",
        help="arm a fault at start (repeatable): stage_move_error, beam_current_drop, "
        "gis_heater_failure, vacuum_loss, comms_drop, hang, crash",
    )
    s.add_argument("--log-level", default="warning")
    s.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="shut down when stdin reaches EOF (the parent that started us holds the pipe)",
    )

    d = sub.add_parser("dataset", help="export one specimen with and without Pt infiltration")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--slices", type=_positive_int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", choices=sorted(PRESETS), default="96:2:2")
    d.add_argument("--geometry", choices=["cross_section", "planar"], default="cross_section")
    d.add_argument("--width-px", type=_positive_int, default=512)
    d.add_argument("--height-px", type=_positive_int, default=384)
    d.add_argument("--pixel-size-m", type=_positive_float, default=4.05e-8)
    d.add_argument("--cache-dir", type=Path, default=None)
    d.add_argument(
        "--partial",
        action="store_true",
        help="also write partial-pt/: Pt reaches only half the face area (a partial infiltration)",
    )
    return p


def _progress_line(fraction: float) -> None:
    print(f"\rbuilding specimen {fraction * 100:5.1f} %", end="", file=sys.stderr, flush=True)


async def _serve(args: argparse.Namespace) -> int:
    if args.token is not None:
        raise ValueError(
            "--token is not accepted (every local user can read a command line): "
            f"use --token-file FILE or ${TOKEN_ENV}"
        )
    # Given a token file, a missing or empty one is an error: never serve unauthenticated by accident.
    token = (
        read_secret(args.token_file, "--token-file") if args.token_file else os.environ.get(TOKEN_ENV) or None
    )
    check_bind(args.host, token)
    faults = [parse_fault_flag(f) for f in args.fault]
    for spec in faults:
        try:
            check_fault_applicable(spec)
        except InvalidRequest as exc:
            raise ValueError(f"--fault: {exc.message}") from None
    # Bind first: a bad or busy port fails now, not after the specimen build. Until we serve,
    # connections wait in the listen backlog; the ready line is printed only once we do.
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    size = RunSize(
        width_px=args.width_px,
        height_px=args.height_px,
        pixel_size_m=args.pixel_size_m,
        slices=args.slices,
        slice_thickness_m=args.slice_thickness_m,
    )
    t0 = time.monotonic()
    try:
        sim = await asyncio.to_thread(
            make_simulator,
            size,
            preset=args.preset,
            seed=args.seed,
            geometry=args.geometry,
            time_scale=args.time_scale,
            cache_dir=args.cache_dir,
            faults=faults,
            progress=_progress_line,
        )
    except BaseException:
        sock.close()
        raise
    print(file=sys.stderr)
    routers = [test_router(sim)] if args.test_endpoints else []
    app = build_app(sim, token=token, title="kintsugi-sim instrument API", extra_routers=routers)
    host, port = sock.getsockname()[:2]
    ready = {
        "event": "ready",
        "url": f"http://{host}:{port}",
        "port": port,
        "specimen_shape": list(sim.specimen.materials.shape),
        "startup_s": round(time.monotonic() - t0, 2),
        "test_endpoints": args.test_endpoints,
    }
    print(json.dumps(ready), flush=True)
    # SIGTERM/SIGINT (or stdin EOF) stop the instrument first, then uvicorn drains the open requests.
    await serve(
        app, sock, log_level=args.log_level, on_shutdown=sim.stop, exit_on_stdin_eof=args.exit_on_stdin_eof
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        manifests = export_dataset(
            args.out,
            slices=args.slices,
            seed=args.seed,
            preset=args.preset,
            width_px=args.width_px,
            height_px=args.height_px,
            pixel_size_m=args.pixel_size_m,
            geometry=args.geometry,
            cache_dir=args.cache_dir,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            partial=args.partial,
        )
        for variant, manifest in manifests.items():
            print(
                f"{args.out / variant}: {len(manifest['slices'])} slices, detectors {manifest['detectors']}"
            )
        return 0
    except ValueError as exc:
        print(f"kintsugi-sim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
