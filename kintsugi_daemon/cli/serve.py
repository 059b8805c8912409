"""`kintsugi serve`: run the daemon (the systemd unit's command)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from kintsugi_daemon.config import load_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", type=Path, default=None)
    s.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from kintsugi_daemon.service.wiring import configure_logging, run_service

    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.json_output)
    asyncio.run(run_service(settings))
    return 0
