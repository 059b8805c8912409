"""`kintsugi web [--config FILE]`: the live page, its own process (a crash of the page never touches a
run). It reads the daemon's settings file for the broker address and its `[web]` section."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path

from kintsugi_daemon.config import load_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("web", help="serve the live web page (read-only until an operator logs in)")
    p.add_argument("--config", type=Path, default=None, help="settings TOML ([mqtt] and [web] sections)")
    p.add_argument("--host", default=None, help="address to listen on (default: web.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: web.port; 0: any free port)")
    p.set_defaults(handler=_web)


def _web(args: argparse.Namespace) -> int:
    import uvicorn

    from kintsugi_daemon.web.app import build_app

    settings = load_settings(args.config)
    host = args.host or settings.web.host
    port = settings.web.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be within 0..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(build_app(settings), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    broker = f"{settings.mqtt.host}:{settings.mqtt.port}"
    print(f"kintsugi web: http://{host}:{bound}/ (broker {broker})", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    print("kintsugi web: stopped", file=sys.stderr)
    return 0
