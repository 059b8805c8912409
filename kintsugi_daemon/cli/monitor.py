"""`kintsugi status` and `kintsugi watch`: what a running daemon is doing, read from its MQTT topics."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from kintsugi_daemon.cli.operator import add_connection_options, operator_for
from kintsugi_daemon.cli.remote import DaemonView

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="the daemon's state, progress and alerts")
    status.add_argument("--json", action="store_true")
    add_connection_options(status)
    status.set_defaults(handler=_status)

    watch = sub.add_parser("watch", help="a live view: state, slice n/N, ETA, last metrics, alerts")
    watch.add_argument("--until-done", action="store_true", help="exit when the run has finished")
    add_connection_options(watch)
    watch.set_defaults(handler=_watch)


def _status(args: argparse.Namespace) -> int:
    view = asyncio.run(operator_for(args).snapshot(args.timeout))
    if args.json:
        print(json.dumps({"status": view.status, "progress": view.progress, "alerts": view.alerts}, indent=2))
    else:
        print(view.render())
    return 0


def _watch(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()

    def show(view: DaemonView) -> bool:
        text = view.render()
        print(("\x1b[H\x1b[2J" if tty else "") + text + ("" if tty else "\n---"), flush=True)
        state = (view.status or {}).get("path")
        return bool(
            args.until_done
            and state == "done"
            and view.events
            and any(e.get("type") == "kintsugi.run_finished" for e in view.events)
        )

    asyncio.run(operator_for(args).watch(show))
    return 0
