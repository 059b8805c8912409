"""Operator commands (start, pause, resume, stop, abort, halt, clear): each checks the current state, then
moves the controller; a command the state does not allow raises CommandRefused and changes nothing."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kintsugi_daemon.config import ConfigError, parse_recipe
from kintsugi_daemon.service.journal import EventDraft
from kintsugi_daemon.service.storage import RunStorage
from kintsugi_daemon.states.run import ActiveRun, CommandRefused

if TYPE_CHECKING:
    from kintsugi_daemon.states.controller import Controller

__all__ = ["handle"]

Handler = Callable[["Controller", dict[str, Any]], Awaitable[dict[str, Any]]]


async def handle(ctl: Controller, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    handler = HANDLERS.get(verb)
    if handler is None:
        raise CommandRefused(f"unknown command {verb!r}")
    return await handler(ctl, args)


async def _start(ctl: Controller, args: dict[str, Any]) -> dict[str, Any]:
    if not await ctl.may("start"):
        raise CommandRefused(f"start is not allowed in state {ctl.state}")
    text = args.get("recipe")
    if not isinstance(text, str):
        raise CommandRefused("start needs the recipe's TOML text in 'recipe'")
    try:
        recipe = parse_recipe(text, "recipe")
    except ConfigError as exc:
        raise CommandRefused(str(exc)) from None
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    storage = RunStorage(ctl.settings.data_root, run_id, create=True)
    storage.write_recipe(text)
    total = recipe.run.total_slices
    ctl.journal.create_run(
        run_id,
        recipe.model_dump(mode="json"),
        total,
        events=[EventDraft("run_created", {"name": recipe.run.name, "slices": total}, run_id=run_id)],
    )
    ctl.run = ActiveRun(run_id, recipe, storage, total)
    ctl.pause_requested = ctl.stop_requested = False
    await ctl.fire(
        "start", reason="operator", event_type="run_started", data={"name": recipe.run.name, "slices": total}
    )
    ctl.launch()
    return {"run_id": run_id}


async def _pause(ctl: Controller, args: dict[str, Any]) -> dict[str, Any]:
    now = bool(args.get("now", False))
    if ctl.state in ("paused", "suspended") or (ctl.state == "pausing" and not now):
        raise CommandRefused(f"already {ctl.state}")
    if not ctl.state.startswith("running") and ctl.state not in ("pausing", "resuming"):
        raise CommandRefused(f"pause is not allowed in state {ctl.state}")
    ctl.pause_requested = True
    if ctl.state.startswith("running"):
        await ctl.fire(
            "pause",
            reason="operator (immediate)" if now else "operator",
            event_type="pausing",
            data={"immediate": now},
        )
    if now:
        await ctl.stop_instrument("pause")
    return {"immediate": now}


async def _resume(ctl: Controller, _args: dict[str, Any]) -> dict[str, Any]:
    await ctl.fire("resume", reason="operator", event_type="resumed")
    await ctl.relaunch()
    return {}


async def _stop(ctl: Controller, _args: dict[str, Any]) -> dict[str, Any]:
    if ctl.state in ("paused", "suspended", "faulted"):
        # Nothing is running: the run ends here, with every completed slice kept.
        faulted = ctl.state == "faulted"
        await ctl.fire("stop", reason="operator", event_type="stopping")
        if faulted:
            await _end_faulted(ctl)
        await ctl.end_run("stopped")
        return {}
    if not await ctl.may("stop"):
        raise CommandRefused(f"stop is not allowed in state {ctl.state}")
    ctl.stop_requested = True  # honoured at the next step boundary: the slice in progress completes
    await ctl.fire("stop", reason="operator", event_type="stopping")
    return {}


async def _abort(ctl: Controller, _args: dict[str, Any]) -> dict[str, Any]:
    return await _interrupt_now(ctl, "abort")


async def _halt(ctl: Controller, _args: dict[str, Any]) -> dict[str, Any]:
    return await _interrupt_now(ctl, "halt")


async def _interrupt_now(ctl: Controller, verb: str) -> dict[str, Any]:
    if not await ctl.may(verb):
        raise CommandRefused(f"{verb} is not allowed in state {ctl.state}")
    running = ctl.run_loop_active()
    faulted = ctl.state == "faulted"
    await ctl.fire(verb, reason="operator", event_type="aborting" if verb == "abort" else "halted")
    if faulted:
        await _end_faulted(ctl)
    else:
        await ctl.stop_instrument(verb)
        await ctl.safe_state()
    if not running and verb == "abort":
        await ctl.end_run("aborted")
    return {}


async def _end_faulted(ctl: Controller) -> None:
    """Ending a faulted run acknowledges its alerts; the instrument is made safe once more (the fault's
    own attempt may have failed with it)."""
    for alert_id in list(ctl.alerts):
        ctl.alert_board.clear(alert_id)
    await ctl.safe_state()


async def _clear(ctl: Controller, args: dict[str, Any]) -> dict[str, Any]:
    alert_id = args.get("alert_id")
    if isinstance(alert_id, str):
        if alert_id not in ctl.alerts:
            raise CommandRefused(f"no active alert {alert_id!r}")
        ctl.alert_board.clear(alert_id)
        return {}
    if ctl.state != "faulted":
        raise CommandRefused(f"clear is not allowed in state {ctl.state}")
    for aid in list(ctl.alerts):
        ctl.alert_board.clear(aid)
    await ctl.fire("clear", reason="operator", event_type="cleared")
    return {}


HANDLERS: dict[str, Handler] = {
    "start": _start,
    "pause": _pause,
    "resume": _resume,
    "stop": _stop,
    "abort": _abort,
    "halt": _halt,
    "clear": _clear,
}
