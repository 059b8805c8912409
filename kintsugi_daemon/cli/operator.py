"""`kintsugi start` and the run commands (pause, resume, stop, abort, halt, clear), sent to a running daemon
over MQTT; the connection options and client they share with `status`/`watch`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from kintsugi_daemon.cli.remote import REPLY_TIMEOUT_S, Operator
from kintsugi_daemon.config import ConfigError, DaemonSettings, load_recipe, load_settings, read_secret

__all__ = ["add_connection_options", "operator_for", "register"]

VERBS = ("pause", "resume", "stop", "abort", "halt", "clear")


def add_connection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="daemon settings TOML (env KINTSUGI_* overrides)"
    )
    p.add_argument(
        "--username", default=None, help="operator's MQTT user (default: [operator] or KINTSUGI_OPERATOR__*)"
    )
    p.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="file with the operator's MQTT password (else [operator], $KINTSUGI_OPERATOR__PASSWORD, asked)",
    )
    # Refused with a reason rather than unknown: a password on a command line is readable by every
    # local user (ps, /proc/*/cmdline) and lands in shell history.
    p.add_argument("--password", default=None, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=REPLY_TIMEOUT_S, help="seconds to wait for the daemon")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("start", help="start a run from a recipe")
    which = st.add_mutually_exclusive_group(required=True)
    which.add_argument("recipe", type=Path, nargs="?", help="recipe TOML: validated here, sent inline")
    which.add_argument("--name", default=None, help="a recipe in the daemon's recipe folder (recipes_dir)")
    add_connection_options(st)
    st.set_defaults(handler=_start)

    for verb in VERBS:
        p = sub.add_parser(verb, help=f"{verb} the run")
        if verb == "pause":
            p.add_argument(
                "--now", action="store_true", help="stop patterning now instead of at the step boundary"
            )
        if verb == "clear":
            p.add_argument("--alert", default=None, help="clear one alert (default: all, and leave faulted)")
        add_connection_options(p)
        p.set_defaults(handler=_verb, verb=verb)


def _settings(args: argparse.Namespace) -> DaemonSettings:
    """The broker from `[mqtt]`, the login from the operator's own credentials (flags, `[operator]`,
    KINTSUGI_OPERATOR__*), never the daemon's `[mqtt]` user and password. The password never comes from
    the command line: `--password-file`, `[operator]` password(_file) or KINTSUGI_OPERATOR__PASSWORD for
    that user, else it is asked on a terminal."""
    if getattr(args, "password", None) is not None:
        raise ConfigError(
            "--password is not accepted (a command line is visible to every local user): use --password-file "
            "FILE, [operator] password_file, $KINTSUGI_OPERATOR__PASSWORD, or type it when asked"
        )
    settings = load_settings(args.config)
    op = settings.operator
    username = args.username or op.username
    password: str | None = None
    if args.password_file is not None:
        password = read_secret(args.password_file, "--password-file")
    elif not args.username or op.username in (None, args.username):
        password = op.resolved_password()
    if password is None and username is not None and sys.stdin.isatty():
        password = getpass.getpass(f"MQTT password for {username}: ")
    mqtt = settings.mqtt.model_copy(
        update={"username": username, "password": password, "password_file": None}
    )
    return settings.model_copy(update={"mqtt": mqtt})


def operator_for(args: argparse.Namespace) -> Operator:
    settings = _settings(args)
    return Operator(settings.mqtt, settings.instrument_id)


def _print_reply(reply: dict[str, Any]) -> int:
    if reply.get("accepted"):
        print(f"{reply['verb']}: accepted (state {reply.get('state')})")
        return 0
    print(f"{reply['verb']}: refused: {reply.get('error')} (state {reply.get('state')})", file=sys.stderr)
    return 1


def _start(args: argparse.Namespace) -> int:
    if args.name is not None:
        reply = asyncio.run(operator_for(args).command("start", {"recipe_name": args.name}, args.timeout))
        return _print_reply(reply)
    _, text = load_recipe(args.recipe)  # checked here first: a bad recipe never reaches the daemon
    return _print_reply(asyncio.run(operator_for(args).command("start", {"recipe": text}, args.timeout)))


def _verb(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {}
    if args.verb == "pause" and args.now:
        fields["now"] = True
    if args.verb == "clear" and args.alert:
        fields["alert_id"] = args.alert
    return _print_reply(asyncio.run(operator_for(args).command(args.verb, fields, args.timeout)))
