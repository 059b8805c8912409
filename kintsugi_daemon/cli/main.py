"""`kintsugi`: the daemon's command line.

Each feature module registers its own subcommand (`register(subparsers)` setting `handler`), so the
command line grows without one module knowing every option.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from kintsugi_daemon.drivers.base import InstrumentError

__all__ = ["COMMAND_MODULES", "main"]

# Modules exposing `register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None`.
COMMAND_MODULES = [
    "kintsugi_daemon.cli.demo",
    "kintsugi_daemon.cli.segment",
    "kintsugi_daemon.cli.export",
    "kintsugi_daemon.cli.report",
    "kintsugi_daemon.cli.validate",
    "kintsugi_daemon.cli.serve",
    "kintsugi_daemon.cli.operator",
    "kintsugi_daemon.cli.monitor",
    "kintsugi_daemon.cli.train",
    "kintsugi_daemon.cli.web",
    "kintsugi_daemon.cli.bridge",
    "kintsugi_daemon.cli.quantize",
]

Handler = Callable[[argparse.Namespace], int]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kintsugi", description="unattended kintsugi serial sectioning")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ValueError as exc:
        print(f"kintsugi: error: {exc}", file=sys.stderr)
        return 2
    except (InstrumentError, RuntimeError) as exc:
        print(f"kintsugi: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
