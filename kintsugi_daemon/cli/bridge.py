"""`kintsugi bridge`: the instrument API on the microscope's PC, served from OpenFIBSEM (+ AutoScript).

Prints one JSON ready line on stdout once it listens (as `kintsugi-sim serve` does), then serves until
SIGTERM/SIGINT, which first stops any patterning. The token comes from a file (never the command line);
beyond loopback one is required.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

__all__ = ["DEFAULT_PORT", "read_token_file", "register"]

DEFAULT_PORT = 8781


def read_token_file(path: Path) -> str:
    """The bearer token: the file's only line. Missing, empty or multi-line files are refused by name."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--token-file {path}: cannot read it ({exc})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or len(lines[0]) < 16:
        raise ValueError(f"--token-file {path}: must hold one token of at least 16 characters")
    return lines[0]


def _app_file(text: str) -> tuple[str, str]:
    key, sep, name = text.partition("=")
    if not sep or not key or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME (e.g. deposit='Pt dep'), got {text!r}")
    return key, name


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("bridge", help="serve the instrument API from a real microscope (OpenFIBSEM)")
    b.add_argument("--backend", choices=["thermo", "tescan", "demo"], required=True)
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback: token needed)")
    b.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (on the ready line)")
    b.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token")
    b.add_argument(
        "--microscope-host", default=None, help="AutoScript/Tescan server address (default: localhost)"
    )
    b.add_argument(
        "--application-file",
        type=_app_file,
        action="append",
        default=[],
        metavar="KEY=NAME",
        help="map a recipe application key (si, c, al, pt, cleaning_cross_section, deposit) to this "
        "instrument's application file; repeatable",
    )
    b.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="where the face position and Pt cap from completed patterns survive a bridge restart",
    )
    b.add_argument(
        "--log-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kintsugi-bridge",
        help="OpenFIBSEM logs",
    )
    b.add_argument("--gis-warmup-s", type=float, default=None, help=argparse.SUPPRESS)
    b.add_argument("--log-level", default="warning")
    b.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    b.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from kintsugi_daemon.drivers.bridge.backends import open_backend
    from kintsugi_daemon.drivers.server import build_app, check_bind, listen_socket, serve

    token = read_token_file(args.token_file) if args.token_file is not None else None
    check_bind(args.host, token)
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    t0 = time.monotonic()
    try:
        beam = await asyncio.to_thread(
            open_backend,
            args.backend,
            microscope_host=args.microscope_host,
            log_dir=args.log_dir,
            application_files=dict(args.application_file),
            state_file=args.state_file,
            gis_warmup_s=args.gis_warmup_s,
        )
    except BaseException:
        sock.close()
        raise
    app = build_app(beam, token=token, title=f"kintsugi bridge ({args.backend}) instrument API")
    host, port = sock.getsockname()[:2]
    identity = await beam.identity()
    ready = {
        "event": "ready",
        "url": f"http://{host}:{port}",
        "port": port,
        "backend": args.backend,
        "instrument": identity.model,
        "startup_s": round(time.monotonic() - t0, 2),
    }
    print(json.dumps(ready), flush=True)
    await serve(app, sock, log_level=args.log_level, exit_on_stdin_eof=args.exit_on_stdin_eof)
    return 0
