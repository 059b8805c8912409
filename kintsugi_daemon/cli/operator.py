"""`kintsugi serve` and the operator commands that talk to a running daemon over MQTT."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import DaemonSettings, load_recipe, load_settings

__all__ = ["register"]

VERBS = ("pause", "resume", "stop", "abort", "halt", "clear")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="daemon settings TOML (env KINTSUGI_* overrides)"
    )
    p.add_argument("--username", default=None, help="MQTT user (default: the config's)")
    p.add_argument("--password", default=None, help="MQTT password (default: the config's)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", type=Path, default=None)
    s.set_defaults(handler=_serve)

    st = sub.add_parser("start", help="start a run from a recipe")
    st.add_argument("recipe", type=Path)
    _common(st)
    st.set_defaults(handler=_start)

    for verb in VERBS:
        p = sub.add_parser(verb, help=f"{verb} the run")
        if verb == "pause":
            p.add_argument(
                "--now", action="store_true", help="stop patterning now instead of at the step boundary"
            )
        if verb == "clear":
            p.add_argument("--alert", default=None, help="clear one alert (default: all, and leave faulted)")
        _common(p)
        p.set_defaults(handler=_verb, verb=verb)

    status = sub.add_parser("status", help="the daemon's state, progress and alerts")
    status.add_argument("--json", action="store_true")
    _common(status)
    status.set_defaults(handler=_status)

    watch = sub.add_parser("watch", help="a live view: state, slice n/N, ETA, last metrics, alerts")
    watch.add_argument("--until-done", action="store_true", help="exit when the run has finished")
    _common(watch)
    watch.set_defaults(handler=_watch)


def _settings(args: argparse.Namespace) -> DaemonSettings:
    settings = load_settings(args.config)
    if getattr(args, "username", None) or getattr(args, "password", None):
        mqtt = settings.mqtt.model_copy(
            update={k: v for k, v in (("username", args.username), ("password", args.password)) if v}
        )
        settings = settings.model_copy(update={"mqtt": mqtt})
    return settings


def _operator(args: argparse.Namespace) -> Operator:
    settings = _settings(args)
    return Operator(settings.mqtt, settings.instrument_id)


def _serve(args: argparse.Namespace) -> int:
    from kintsugi_daemon.service.wiring import configure_logging, run_service

    settings = load_settings(args.config)
    configure_logging(settings.logging.level, settings.logging.json_output)
    asyncio.run(run_service(settings))
    return 0


def _print_reply(reply: dict[str, Any]) -> int:
    if reply.get("accepted"):
        print(f"{reply['verb']}: accepted (state {reply.get('state')})")
        return 0
    print(f"{reply['verb']}: refused: {reply.get('error')} (state {reply.get('state')})", file=sys.stderr)
    return 1


def _start(args: argparse.Namespace) -> int:
    _, text = load_recipe(args.recipe)  # checked here first: a bad recipe never reaches the daemon
    return _print_reply(asyncio.run(_operator(args).command("start", {"recipe": text})))


def _verb(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    if args.verb == "pause" and args.now:
        fields["now"] = True
    if args.verb == "clear" and args.alert:
        fields["alert_id"] = args.alert
    return _print_reply(asyncio.run(_operator(args).command(args.verb, fields)))


def _status(args: argparse.Namespace) -> int:
    view = asyncio.run(_operator(args).snapshot())
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

    asyncio.run(_operator(args).watch(show))
    return 0
