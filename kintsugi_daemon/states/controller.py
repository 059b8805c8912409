"""The run controller: owns the state machine, runs the cycle as a supervised task, answers commands.

Every state change is written to the journal together with the event that reports it, and only then
taken in memory. Destructive steps are journaled as an intent before and a completion after; a step
interrupted by a crash, a fault or an immediate pause is reconciled with the instrument before the run
goes on, so no deposit, mill or polish is ever repeated blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from kintsugi_daemon.config import ConfigError, DaemonSettings, Recipe, parse_recipe
from kintsugi_daemon.drivers.base import (
    Aborted,
    Acquisition,
    CommsLost,
    DeadlineExceeded,
    DualBeam,
    InstrumentError,
    InstrumentFault,
)
from kintsugi_daemon.estimate import estimate_run, slice_bytes
from kintsugi_daemon.inference.contract import (
    SHIPPED_MODEL,
    ModelError,
    SegmentationModel,
    check_against_recipe,
)
from kintsugi_daemon.inference.contract import load_model as load_segmentation_model
from kintsugi_daemon.inference.metrics import slice_metrics
from kintsugi_daemon.inference.overlay import overlay
from kintsugi_daemon.inference.tiling import segment as run_segmentation
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.service.storage import DiskFull, RunStorage
from kintsugi_daemon.states import steps as cycle
from kintsugi_daemon.states.guards import GuardReading, Guards
from kintsugi_daemon.states.table import build_machine

__all__ = ["ActiveRun", "CommandRefused", "Controller"]

log = structlog.get_logger("kintsugi.controller")

SAFE_STATE_DEADLINE_S = 60.0
# Classes the adaptive logic reads (unfilled-pore fraction, CBD coverage): a model without them is refused.
REQUIRED_CLASSES = ("pore", "unfilled_pore", "active", "cbd")
RECONCILE_WAIT_S = 600.0
MANIFEST_EVERY = 10  # slices between run.json rewrites (each costs two fsyncs)


class CommandRefused(Exception):
    """A command that the current state does not allow, or whose arguments are wrong; nothing changed."""


class _Interrupted(Exception):
    """The current step was cut short on purpose (immediate pause, abort, halt)."""


class _Refused(Exception):
    """Preflight refused the run before the instrument was touched."""


@dataclass
class ActiveRun:
    run_id: str
    recipe: Recipe
    storage: RunStorage
    total: int
    next_slice: int = 0
    started: float = field(default_factory=time.time)
    slice_times: list[float] = field(default_factory=list)
    acquisition: Acquisition | None = None  # the last image, for segmentation
    face_m: float = 0.0


class Controller:
    state: str  # maintained by the transitions machine

    def __init__(
        self,
        *,
        instrument: DualBeam,
        journal: Journal,
        settings: DaemonSettings,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.instrument = instrument
        self.journal = journal
        self.settings = settings
        self.on_change = on_change
        self.machine = build_machine(self)
        self.reason: str | None = None
        self.since = time.time()
        self.run: ActiveRun | None = None
        self.alerts: dict[str, dict[str, Any]] = {}
        self.step: str | None = None
        self.last_metrics: dict[str, Any] = {}
        self.latest_slice: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pause_requested = False
        self._stop_requested = False
        self._interrupt: str | None = None  # "pause" | "abort" | "halt" while an immediate stop is in flight
        self._wake = asyncio.Event()
        self._guards: Guards | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._model: SegmentationModel | None = None
        self._segmenting: dict[int, asyncio.Task[None]] = {}
        self._segmented: dict[int, dict[str, Any]] = {}  # slice -> metrics and files, until its checkpoint
        self._completions: dict[tuple[int, str], tuple[int, dict[str, Any], list[EventDraft]]] = {}

    # --- machine plumbing -------------------------------------------------------------------------

    def has_active_run(self) -> bool:
        return self.run is not None

    async def _fire(
        self,
        trigger: str,
        *,
        reason: str | None = None,
        events: list[EventDraft] | None = None,
        event_type: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Journal the new state with its events, then take the transition (refused ones change nothing)."""
        if not await getattr(self, f"may_{trigger}")():
            raise CommandRefused(f"{trigger} is not allowed in state {self.state}")
        run_id = self.run.run_id if self.run else None
        drafts = list(events or [])
        if event_type is not None:
            drafts.append(EventDraft(type=event_type, data={"reason": reason, **(data or {})}, run_id=run_id))
        dest = self._destination(trigger)
        with self.journal.transaction():
            self.flush_completions()
            self.journal.set_state(dest, reason, run_id, events=drafts)
        await getattr(self, trigger)()
        self.reason = reason
        self.since = time.time()
        log.info("state", state=self.state, trigger=trigger, reason=reason, run_id=run_id)
        self.on_change()

    def _destination(self, trigger: str) -> str:
        for transition in self.machine.get_transitions(trigger, source=self.state):
            dest = transition.dest
            if dest is not None:
                if trigger == "clear":
                    return "paused" if self.has_active_run() else "idle"
                return str(dest)
        # A child state (running.mill) matches transitions declared on its parent.
        parent = self.state.split(".")[0]
        for transition in self.machine.get_transitions(trigger, source=parent):
            if transition.dest is not None:
                return str(transition.dest)
        return self.state

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "since": self.since,
            "run_id": self.run.run_id if self.run else None,
            "step": self.step,
        }

    def progress(self) -> dict[str, Any] | None:
        run = self.run
        if run is None:
            return None
        if run.slice_times:
            per_slice = sum(run.slice_times[-10:]) / len(run.slice_times[-10:])
        else:
            per_slice = estimate_run(run.recipe).seconds_per_slice
        remaining = run.total - run.next_slice
        return {
            "run_id": run.run_id,
            "slice": run.next_slice,
            "total": run.total,
            "step": self.step,
            "percent": round(100.0 * run.next_slice / run.total, 2),
            "eta_s": round(per_slice * remaining, 1),
        }

    # --- start-up and recovery --------------------------------------------------------------------

    async def boot(self) -> None:
        record = self.journal.active_run()
        if record is None:
            await self._fire("booted", reason="started")
            return
        recipe = parse_recipe(
            Path(self.settings.data_root / record.run_id / "recipe.toml").read_text(),
            f"run {record.run_id} recipe",
        )
        storage = RunStorage(self.settings.data_root, record.run_id, create=False)
        checkpoint = self.journal.last_checkpoint(record.run_id)
        self.run = ActiveRun(
            record.run_id,
            recipe,
            storage,
            record.total_slices,
            next_slice=checkpoint[0] + 1 if checkpoint else 0,
        )
        await self._fire("recover", reason="recovered", event_type="recovering")
        try:
            await self._reconcile_open_steps()
        except InstrumentError as exc:
            await self._fault(exc, where="recovery")
            return
        await self._fire(
            "recovered", reason="recovered", event_type="paused", data={"next_slice": self.run.next_slice}
        )

    async def _wait_idle(self) -> Any:
        """The instrument's state once it finished whatever it was doing when we lost track of it."""
        async with asyncio.timeout(RECONCILE_WAIT_S):
            while True:
                state = await self.instrument.state()
                if state.busy is None:
                    return state
                await asyncio.sleep(0.5)

    async def _reconcile_open_steps(self) -> None:
        assert self.run is not None
        open_steps = self.journal.open_steps(self.run.run_id)
        if not open_steps:
            return
        state = await self._wait_idle()
        for rec in open_steps:
            verdict = cycle.reconcile(rec.step, rec.params, state)
            event = EventDraft(
                "step_reconciled",
                {
                    "step": rec.step,
                    "slice": rec.slice_index,
                    "happened": verdict.happened,
                    **verdict.evidence,
                },
                run_id=self.run.run_id,
            )
            result = {"reconciled": True, **verdict.evidence}
            if verdict.happened:
                self.journal.complete_step(rec.id, result, events=[event])
            else:
                self.journal.fail_step(rec.id, result, events=[event])
            log.warning("reconciled", step=rec.step, slice=rec.slice_index, happened=verdict.happened)

    # --- commands ---------------------------------------------------------------------------------

    async def command(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        """Carry out an operator command; raise CommandRefused (changing nothing) when it cannot be."""
        self._wake.set()
        if verb == "start":
            return await self._start(args)
        if verb == "pause":
            return await self._pause(now=bool(args.get("now", False)))
        if verb == "resume":
            await self._fire("resume", reason="operator", event_type="resumed")
            await self._relaunch()
            return {}
        if verb == "stop":
            return await self._stop()
        if verb in ("abort", "halt"):
            return await self._interrupt_now(verb)
        if verb == "clear":
            return await self._clear(args.get("alert_id"))
        raise CommandRefused(f"unknown command {verb!r}")

    async def _start(self, args: dict[str, Any]) -> dict[str, Any]:
        if not await self.may_start():  # type: ignore[attr-defined]
            raise CommandRefused(f"start is not allowed in state {self.state}")
        text = args.get("recipe")
        if not isinstance(text, str):
            raise CommandRefused("start needs the recipe's TOML text in 'recipe'")
        try:
            recipe = parse_recipe(text, "recipe")
        except ConfigError as exc:
            raise CommandRefused(str(exc)) from None
        run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
        storage = RunStorage(self.settings.data_root, run_id, create=True)
        storage.write_recipe(text)
        total = recipe.run.total_slices
        self.journal.create_run(
            run_id,
            recipe.model_dump(mode="json"),
            total,
            events=[EventDraft("run_created", {"name": recipe.run.name, "slices": total}, run_id=run_id)],
        )
        self.run = ActiveRun(run_id, recipe, storage, total)
        self._pause_requested = self._stop_requested = False
        await self._fire(
            "start",
            reason="operator",
            event_type="run_started",
            data={"name": recipe.run.name, "slices": total},
        )
        self._launch()
        return {"run_id": run_id}

    async def _pause(self, *, now: bool) -> dict[str, Any]:
        if self.state in ("paused", "suspended") or (self.state == "pausing" and not now):
            raise CommandRefused(f"already {self.state}")
        if not self.state.startswith("running") and self.state not in ("pausing", "resuming"):
            raise CommandRefused(f"pause is not allowed in state {self.state}")
        self._pause_requested = True
        if self.state.startswith("running"):
            await self._fire(
                "pause",
                reason="operator (immediate)" if now else "operator",
                event_type="pausing",
                data={"immediate": now},
            )
        if now:
            await self._stop_instrument("pause")
        return {"immediate": now}

    async def _stop(self) -> dict[str, Any]:
        if self.state in ("paused", "suspended"):
            # Nothing is running: the run ends here, with every completed slice kept.
            await self._fire("stop", reason="operator", event_type="stopping")
            await self._end_run("stopped")
            return {}
        if not await self.may_stop():  # type: ignore[attr-defined]
            raise CommandRefused(f"stop is not allowed in state {self.state}")
        self._stop_requested = True  # honoured at the next step boundary: the slice in progress completes
        await self._fire("stop", reason="operator", event_type="stopping")
        return {}

    async def _interrupt_now(self, verb: str) -> dict[str, Any]:
        if not await getattr(self, f"may_{verb}")():
            raise CommandRefused(f"{verb} is not allowed in state {self.state}")
        running = self._task is not None and not self._task.done()
        await self._fire(verb, reason="operator", event_type="aborting" if verb == "abort" else "halted")
        await self._stop_instrument(verb)
        await self._safe_state()
        if not running and verb == "abort":
            await self._end_run("aborted")
        return {}

    async def _clear(self, alert_id: Any) -> dict[str, Any]:
        if isinstance(alert_id, str):
            if alert_id not in self.alerts:
                raise CommandRefused(f"no active alert {alert_id!r}")
            self._clear_alert(alert_id)
            return {}
        if self.state != "faulted":
            raise CommandRefused(f"clear is not allowed in state {self.state}")
        for aid in list(self.alerts):
            self._clear_alert(aid)
        await self._fire("clear", reason="operator", event_type="cleared")
        return {}

    async def shutdown(self, wait_s: float) -> None:
        """SIGTERM: pause at the next step boundary (the run stays resumable), stopping the step if it
        does not finish within `wait_s`."""
        if self._task is None or self._task.done():
            return
        self._pause_requested = True
        if self.state.startswith("running"):
            await self._fire("pause", reason="shutdown", event_type="pausing")
        try:
            await asyncio.wait_for(asyncio.shield(self._task), wait_s)
        except TimeoutError:
            await self._stop_instrument("pause")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 60.0)

    async def close(self) -> None:
        """Cancel every task this controller runs (after shutdown, or when a test ends)."""
        tasks = [t for t in (self._task, self._guard_task, *self._segmenting.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._completions:
            with self.journal.transaction():
                self.flush_completions()

    async def _stop_instrument(self, why: str) -> None:
        self._interrupt = why
        with contextlib.suppress(InstrumentError):
            await self.instrument.stop(deadline_s=10.0)
        self._wake.set()

    async def _safe_state(self) -> None:
        try:
            result = await self.instrument.safe_state(deadline_s=SAFE_STATE_DEADLINE_S)
            log.info("safe_state", **result.model_dump())
        except InstrumentError as exc:
            self._raise_alert(
                "safe_state_failed", "critical", f"could not put the instrument in a safe state: {exc}"
            )

    # --- alerts -----------------------------------------------------------------------------------

    def _raise_alert(self, alert_id: str, severity: str, message: str) -> None:
        self.alerts[alert_id] = {
            "id": alert_id,
            "severity": severity,
            "message": message,
            "since": time.time(),
            "run_id": self.run.run_id if self.run else None,
        }
        self.journal.publish(
            [EventDraft("alert_raised", self.alerts[alert_id], run_id=self.run.run_id if self.run else None)]
        )
        log.warning("alert", **self.alerts[alert_id])
        self.on_change()

    def _clear_alert(self, alert_id: str) -> None:
        if self.alerts.pop(alert_id, None) is not None:
            self.journal.publish(
                [EventDraft("alert_cleared", {"id": alert_id}, run_id=self.run.run_id if self.run else None)]
            )
            self.on_change()

    # --- the run ----------------------------------------------------------------------------------

    def _launch(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="kintsugi-run")

    async def _relaunch(self) -> None:
        """Start the run loop again (after pause, suspension, fault or recovery); the old one is ending."""
        if self._task is not None and not self._task.done():
            await asyncio.wait_for(asyncio.shield(self._task), 30.0)
        self._launch()

    async def wait_run(self) -> None:
        """Until the current run loop task ends (tests, shutdown)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def _supervise(self) -> None:
        try:
            await self._run_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("run loop failed")
            await self._fault(exc, where=self.step or "run")

    async def _fault(self, exc: BaseException, *, where: str) -> None:
        message = f"{where}: {type(exc).__name__}: {exc}"
        self._raise_alert("fault", "critical", message)
        if await self.may_fault():  # type: ignore[attr-defined]
            await self._fire(
                "fault", reason=message, event_type="fault", data={"step": where, "error": type(exc).__name__}
            )
        await self._safe_state()

    async def _run_loop(self) -> None:
        run = self.run
        assert run is not None
        if self.state == "preflight":
            try:
                await self._preflight()
            except _Refused:
                return
        elif self._guards is None:
            self._guards = Guards(run.recipe.guards)
        await self._catch_up_segmentation()
        while True:
            if await self._boundary():
                return
            plan = self._next_step()
            if plan is None:
                await self._end_run("done")
                return
            index, step = plan
            try:
                await self._execute(index, step)
            except CommandRefused:
                continue  # a command moved the machine meanwhile; the boundary handles it
            except _Interrupted:
                continue  # the boundary decides: paused, aborted or halted
            except (InstrumentFault, CommsLost, DeadlineExceeded) as exc:
                if await self._suspend_for_guards():
                    continue
                await self._fault(exc, where=step)
                return

    async def _preflight(self) -> None:
        run = self.run
        assert run is not None
        state = await self.instrument.state()
        identity = await self.instrument.identity()
        needed = slice_bytes(run.recipe) * run.total
        self._guards = Guards(run.recipe.guards)
        self.journal.publish(
            [
                EventDraft(
                    "preflight",
                    {
                        "instrument": identity.model_dump(),
                        "vacuum": state.vacuum,
                        "disk_needed_bytes": needed,
                        "disk_free_bytes": run.storage.free_bytes(),
                    },
                    run_id=run.run_id,
                )
            ]
        )
        problem = None if state.vacuum == "pumped" else f"vacuum {state.vacuum}"
        if problem is None and run.recipe.segmentation.enabled:
            try:
                await self._ensure_model()
            except ModelError as exc:
                problem = f"segmentation model: {exc}"
        if problem is not None:
            await self._fire("preflight_failed", reason=problem, event_type="run_refused")
            self._raise_alert("preflight", "warning", problem)
            storage = run.storage
            self.journal.finish_run(
                run.run_id,
                "aborted",
                events=[
                    EventDraft(
                        "run_finished", {"how": "refused", "reason": problem, "slices": 0}, run_id=run.run_id
                    )
                ],
            )
            storage.write_manifest(self._manifest("refused"))
            self.run = None
            raise _Refused()

    def _next_step(self) -> tuple[int, str] | None:
        run = self.run
        assert run is not None
        if run.next_slice >= run.total:
            return None
        done = {r.step for r in self.journal.steps(run.run_id, run.next_slice) if r.ok}
        done |= {step for (index, step) in self._completions if index == run.next_slice}
        if run.next_slice in self._segmenting:
            done.add("segment")  # running in the background; its own task journals the result
        for step in cycle.steps_for_slice(run.recipe, run.next_slice):
            if step not in done:
                return run.next_slice, step
        return None

    async def _boundary(self) -> bool:
        """Between steps: honour pause, stop, abort and halt, and the guards. True: the loop must end."""
        interrupt, self._interrupt = self._interrupt, None
        if self.state == "aborting" or interrupt == "abort":
            await self._end_run("aborted")
            return True
        if self.state == "faulted":
            return True
        if self._stop_requested and self._slice_boundary():
            await self._end_run("stopped")
            return True
        if (
            self._pause_requested and self.state in ("pausing", "running", "resuming")
        ) or self.state == "pausing":
            self._pause_requested = False
            await self._drain_segmentation()  # a paused run has every finished slice segmented
            await self._fire("paused", reason=self.reason or "operator", event_type="paused")
        if self.state in ("paused", "suspended"):
            return True  # the loop ends; `resume` launches it again
        return await self._suspend_for_guards()

    def _slice_boundary(self) -> bool:
        run = self.run
        assert run is not None
        if any(index == run.next_slice for index, _ in self._completions):
            return False  # a step of this slice finished (its completion rides on the next commit)
        return not any(r.ok for r in self.journal.steps(run.run_id, run.next_slice))

    async def _suspend_for_guards(self) -> bool:
        """Check the guards; suspend (and wait for them to settle) if one trips. True: now suspended."""
        if self._guards is None or self.run is None:
            return False
        checked = await self._check_guards()
        if checked is None:
            return False
        newly, _ = checked
        if not self._guards.tripped:
            return False
        for r in newly:
            self._raise_alert(f"guard_{r.name}", "warning", r.message)
        if self.state != "suspended":
            names = ", ".join(sorted(self._guards.tripped))
            await self._fire(
                "suspend",
                reason=f"guard: {names}",
                event_type="suspended",
                data={"guards": sorted(self._guards.tripped)},
            )
            self._guard_task = asyncio.create_task(self._watch_guards(), name="kintsugi-guards")
        return True

    async def _check_guards(self) -> tuple[list[GuardReading], bool] | None:
        """Read the instrument and update the guards: (newly tripped, settled clear); None if unreadable."""
        assert self._guards is not None and self.run is not None
        try:
            state = await self.instrument.state()
        except InstrumentError:
            return None
        needs_gis = "deposit_pt" in cycle.steps_for_slice(self.run.recipe, self.run.next_slice)
        readings = self._guards.evaluate(state, self.run.storage.free_bytes(), needs_gis=needs_gis)
        return self._guards.update(readings, time.monotonic())

    async def _watch_guards(self) -> None:
        assert self._guards is not None and self.run is not None
        poll = self.run.recipe.guards.poll_s
        while self.state == "suspended":
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            if self.state != "suspended":
                return
            checked = await self._check_guards()
            if checked is None:
                continue
            _, settled = checked
            for name in [a for a in self.alerts if a.startswith("guard_")]:
                if name.removeprefix("guard_") not in self._guards.tripped:
                    self._clear_alert(name)
            if settled:
                await self._fire("resume", reason="guards clear", event_type="resumed")
                await self._relaunch()
                return

    async def _end_run(self, how: str) -> None:
        run = self.run
        assert run is not None
        await self._drain_segmentation()
        with self.journal.transaction():
            self.flush_completions()
        self.journal.finish_run(
            run.run_id,
            how,
            events=[
                EventDraft(
                    "run_finished",
                    {"how": how, "slices": run.next_slice, "total": run.total},
                    run_id=run.run_id,
                )
            ],
        )
        run.storage.write_manifest(self._manifest(how))
        await self._fire("finish", reason=how, event_type="done", data={"slices": run.next_slice})
        self.step = None
        self.run = None

    def _manifest(self, how: str | None) -> dict[str, Any]:
        run = self.run
        assert run is not None
        return {
            "run_id": run.run_id,
            "name": run.recipe.run.name,
            "total_slices": run.total,
            "completed_slices": run.next_slice,
            "state": how or "running",
            "slice_thickness_m": run.recipe.run.slice_thickness_m,
            "pixel_size_m": run.recipe.imaging.pixel_size_m,
            "detectors": list(run.recipe.imaging.detectors),
            "started": run.started,
            "updated": time.time(),
        }

    # --- one step ---------------------------------------------------------------------------------

    async def _execute(self, index: int, step: str) -> None:
        run = self.run
        assert run is not None
        # Every log line of this step carries the run, slice and step (structlog context of the run task).
        structlog.contextvars.bind_contextvars(run_id=run.run_id, slice=index, step=step)
        params: dict[str, Any] = {"slice": index}
        reason = self.reason if self.state == "stopping" else None
        if step in cycle.DESTRUCTIVE:
            state = await self.instrument.state()
            if self._earlier_attempt_took_effect(index, step, state):
                return
            params |= cycle.before(state)
            run.face_m = state.face_position_m
            if step == "mill":
                params["thickness_m"] = self._remaining_thickness(index, state)
            elif step == "deposit_pt":
                params["thickness_m"] = run.recipe.pt.thickness_m
            elif step == "polish":
                params["passes"] = run.recipe.polish.passes
        if step == "image":
            run.storage.ensure_space(slice_bytes(run.recipe), run.recipe.guards.min_free_disk_bytes // 2)
        if step == "segment":
            await self._fire("begin_segment", reason=reason)
            self.step = step
            images = run.acquisition.images if run.acquisition is not None else None
            await self._launch_segmentation(index, images)
            self.on_change()
            return
        if step == "checkpoint":
            await self._checkpoint(index, reason)
            return
        # The state change and the intent share one transaction: one fsync, and never one without the other.
        with self.journal.transaction():
            step_id = self.journal.begin_step(
                run.run_id,
                index,
                step,
                params,
                events=[EventDraft("step_started", {"slice": index, "step": step}, run_id=run.run_id)],
            )
            await self._fire(f"begin_{step}", reason=reason)
        self.step = step
        t0 = time.monotonic()
        try:
            result = await self._perform(index, step, params)
        except Aborted as exc:
            self.journal.fail_step(
                step_id,
                {"error": "aborted", **exc.detail},
                events=[
                    EventDraft(
                        "step_aborted", {"slice": index, "step": step, **exc.detail}, run_id=run.run_id
                    )
                ],
            )
            raise _Interrupted() from exc
        except (InstrumentError, DiskFull) as exc:
            detail = getattr(exc, "detail", {})
            self.journal.fail_step(
                step_id,
                {"error": type(exc).__name__, "message": str(exc), **detail},
                events=[
                    EventDraft(
                        "step_failed",
                        {"slice": index, "step": step, "error": type(exc).__name__, "message": str(exc)},
                        run_id=run.run_id,
                    )
                ],
            )
            if self._interrupt is not None:
                raise _Interrupted() from exc
            if isinstance(exc, DiskFull):
                raise InstrumentFault(f"disk full: {exc}") from exc
            raise
        result["duration_s"] = round(time.monotonic() - t0, 4)
        events = [
            EventDraft(
                "step_completed", {"slice": index, "step": step, **_summary(result)}, run_id=run.run_id
            )
        ]
        # Committed with the next state change (the next step's intent, a pause, a fault...): one
        # fsync fewer per step. A crash before that is covered: recovery reconciles an open step.
        self._completions[(index, step)] = (step_id, result, events)
        self.on_change()

    def flush_completions(self) -> None:
        """Write the step completions held back for the next transaction (call inside one)."""
        pending, self._completions = self._completions, {}
        for step_id, result, events in pending.values():
            self.journal.complete_step(step_id, result, events=events)

    async def _checkpoint(self, index: int, reason: str | None) -> None:
        """The slice is done: state, held-back completions and the checkpoint in one transaction."""
        run = self.run
        assert run is not None
        first = self.journal.steps(run.run_id, index)
        period = time.time() - min(r.started for r in first) if first else 0.0
        result = {"face_position_m": run.face_m}
        with self.journal.transaction():
            await self._fire("begin_checkpoint", reason=reason)
            self.step = "checkpoint"
            self.journal.checkpoint(
                run.run_id,
                index,
                result,
                events=[
                    EventDraft(
                        "slice_completed",
                        {"slice": index, "slice_period_s": round(period, 3), **result},
                        run_id=run.run_id,
                    )
                ],
            )
        run.next_slice = index + 1
        run.slice_times.append(period)
        self.latest_slice = {
            "run_id": run.run_id,
            "slice": index,
            "z_m": run.face_m,
            "thickness_m": run.recipe.run.slice_thickness_m,
            "files": self._slice_files(index),
        }
        segmented = self._segmented.pop(index, None)
        if segmented is not None:  # segmentation beat the checkpoint (it usually runs into the next slice)
            self.latest_slice["metrics"] = segmented["metrics"]
            self.latest_slice["files"] |= segmented["files"]
        if run.next_slice % MANIFEST_EVERY == 0 or run.next_slice == run.total:
            run.storage.write_manifest(
                self._manifest(None)
            )  # progress for readers; slice records are the truth
        self.on_change()

    def _attempts(self, index: int, step: str) -> list[Any]:
        assert self.run is not None
        return [r for r in self.journal.steps(self.run.run_id, index) if r.step == step]

    def _earlier_attempt_took_effect(self, index: int, step: str, state: Any) -> bool:
        """A destructive step that failed or was cut short may still have happened: ask the instrument."""
        attempts = self._attempts(index, step)
        if not attempts:
            return False
        first = attempts[0]
        verdict = cycle.reconcile(
            step, {**first.params, "thickness_m": first.params.get("thickness_m", 0.0)}, state
        )
        if not verdict.happened:
            return False
        assert self.run is not None
        step_id = self.journal.begin_step(self.run.run_id, index, step, {**first.params, "reconciled": True})
        self.journal.complete_step(
            step_id,
            {"reconciled": True, **verdict.evidence},
            events=[
                EventDraft(
                    "step_reconciled",
                    {"slice": index, "step": step, "happened": True, **verdict.evidence},
                    run_id=self.run.run_id,
                )
            ],
        )
        return True

    async def _ensure_model(self) -> SegmentationModel:
        """Load and check the recipe's model (at preflight, or on the first slice after a restart)."""
        run = self.run
        assert run is not None
        if self._model is None:
            seg = run.recipe.segmentation
            path = SHIPPED_MODEL if seg.model == "builtin" else Path(seg.model)
            model = await asyncio.to_thread(
                load_segmentation_model, path, override=seg.metadata, threads=seg.threads
            )
            img = run.recipe.imaging
            check_against_recipe(model.spec, img.detectors, REQUIRED_CLASSES, img.pixel_size_m)
            self._model = model
        return self._model

    async def _launch_segmentation(self, index: int, images: dict[str, Any] | None) -> None:
        """Segment a slice in a worker thread while the instrument goes on with the next slice.

        The fixed schedule takes no decision from a slice's segmentation, so nothing waits for it but
        the next segmentation (a backlog of one), a pause and the end of the run. Adaptive policies that
        decide re-deposition or dwell from the metrics wait for it in their adapt step."""
        await self._drain_segmentation()
        run = self.run
        assert run is not None
        step_id = self.journal.begin_step(run.run_id, index, "segment", {"slice": index})
        task = asyncio.create_task(self._segment(index, step_id, images), name=f"kintsugi-segment-{index}")
        self._segmenting[index] = task

    async def _segment(self, index: int, step_id: int, images: dict[str, Any] | None) -> None:
        run = self.run
        assert run is not None
        storage, recipe = run.storage, run.recipe
        try:
            model = await self._ensure_model()
            if images is None:  # a restart: read the slice back from disk
                images = await asyncio.to_thread(_read_images, storage.run_dir, storage.read_slice(index))
            t0 = time.monotonic()
            result = await asyncio.to_thread(run_segmentation, model, images)
            infer_s = time.monotonic() - t0
            metrics = await asyncio.to_thread(
                slice_metrics,
                result.labels,
                recipe.imaging.pixel_size_m,
                max_probability=result.max_probability,
                entropy=result.entropy,
            )
            first = recipe.imaging.detectors[0]
            preview = await asyncio.to_thread(overlay, images[first], result.labels)
            numeric = metrics.numeric()
            files = await asyncio.to_thread(
                storage.write_segmentation,
                index,
                result.labels,
                preview,
                {"metrics": numeric, "inference_s": round(infer_s, 3)},
            )
        except Exception as exc:  # a failed segmentation never stops sectioning; it is reported
            log.exception("segmentation failed", slice=index)
            self.journal.fail_step(
                step_id,
                {"error": type(exc).__name__, "message": str(exc)},
                events=[
                    EventDraft("segmentation_failed", {"slice": index, "error": str(exc)}, run_id=run.run_id)
                ],
            )
            self._raise_alert("segmentation", "warning", f"slice {index}: segmentation failed: {exc}")
            return
        finally:
            self._segmenting.pop(index, None)
        self.last_metrics = {"slice": index, **numeric}
        self.journal.complete_step(
            step_id,
            {"files": files, "inference_s": round(infer_s, 3)},
            events=[
                EventDraft(
                    "segmented",
                    {"slice": index, "inference_s": round(infer_s, 3), **numeric},
                    run_id=run.run_id,
                )
            ],
        )
        products = {"segmentation" if k == "record" else k: v for k, v in files.items()}
        if run.next_slice <= index:  # not checkpointed yet: the checkpoint picks it up
            self._segmented[index] = {"metrics": numeric, "files": products}
        elif self.latest_slice is not None and self.latest_slice.get("slice") == index:
            self.latest_slice = {
                **self.latest_slice,
                "metrics": numeric,
                "files": {**self.latest_slice.get("files", {}), **products},
            }
        self.on_change()

    async def _drain_segmentation(self) -> None:
        for task in list(self._segmenting.values()):
            with contextlib.suppress(Exception):
                await task

    async def _catch_up_segmentation(self) -> None:
        """Slices whose segmentation a crash or fault cut short are segmented again from their files."""
        run = self.run
        assert run is not None
        if not run.recipe.segmentation.enabled:
            return
        for index in range(run.next_slice):
            steps = [r for r in self.journal.steps(run.run_id, index) if r.step == "segment"]
            unfinished = steps and not any(r.ok for r in steps)
            if (
                unfinished
                and run.storage.slice_complete(index)
                and not run.storage.segmentation_complete(index)
            ):
                await self._launch_segmentation(index, None)
                await self._drain_segmentation()

    def _slice_files(self, index: int) -> dict[str, str]:
        assert self.run is not None
        for rec in self.journal.steps(self.run.run_id, index):
            if rec.step == "image" and rec.ok and rec.result:
                return dict(rec.result.get("files", {}))
        return {}

    def _remaining_thickness(self, index: int, state: Any) -> float:
        """A mill cut short (immediate pause, fault) is finished with only what is left of the slice."""
        run = self.run
        assert run is not None
        thickness = run.recipe.run.slice_thickness_m
        attempts = self._attempts(index, "mill")
        if not attempts:
            return thickness
        removed = float(state.face_position_m) - float(attempts[0].params["face_before_m"])
        return max(thickness - removed, run.recipe.run.min_slice_thickness_m)

    async def _perform(self, index: int, step: str, params: dict[str, Any]) -> dict[str, Any]:
        run = self.run
        assert run is not None
        recipe = run.recipe
        if step == "deposit_pt":
            return await cycle.deposit(self.instrument, recipe)
        if step == "mill":
            return await cycle.mill(self.instrument, recipe, float(params["thickness_m"]))
        if step == "polish":
            return await cycle.polish(self.instrument, recipe)
        if step == "image":
            if run.storage.slice_complete(index):
                # Written before a crash that beat the journal: the files are the truth, do not re-image.
                return {"files": run.storage.read_slice(index)["files"], "recovered": True}
            acq = await cycle.image(self.instrument, recipe)
            paths = await asyncio.to_thread(
                run.storage.write_slice,
                index,
                acq.images,
                acq.metadata.model_dump(mode="json"),
                None,
                None,
                replace=True,
            )
            run.acquisition = acq
            means = {name: round(float(img.mean()), 1) for name, img in acq.images.items()}
            return {"files": paths, "mean_grey": means, "face_position_m": acq.metadata.face_position_m}
        if step == "adapt":
            return {"policy": recipe.adapt.policy, "decisions": {}}
        raise AssertionError(f"unknown step {step}")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """Flat scalars of a step result for its event (file lists and arrays stay in the journal)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _read_images(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    import tifffile

    return {
        name: tifffile.imread(run_dir / rel)
        for name, rel in record["files"].items()
        if name not in ("labels", "overlay")
    }
