"""The run controller: owns the state machine, runs the cycle as a supervised task, changes state.

Every state change is written to the journal together with the event that reports it, and only then
taken in memory. Destructive steps are journaled as an intent (the very request sent) before and a
completion after; a step interrupted by a crash, a fault or an immediate pause is reconciled with the
instrument before the run goes on, so no deposit, mill or polish is ever repeated blindly.

Its concerns live beside it: operator commands (`commands`), alerts (`alerts`), the segmentation pipeline
(`segmentation`), checkpoint records and the manifest (`checkpoint`), crash reconciliation (`recovery`)
and the steps themselves (`steps`, a registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import structlog

from kintsugi_daemon.config import DaemonSettings
from kintsugi_daemon.drivers.base import (
    Aborted,
    CommsLost,
    DeadlineExceeded,
    DualBeam,
    InstrumentError,
    InstrumentFault,
)
from kintsugi_daemon.service import profiling
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.states import adapting, commands, recovery, steps
from kintsugi_daemon.states.adapting import AdaptSuspended
from kintsugi_daemon.states.alerts import Alerts
from kintsugi_daemon.states.checkpoint import (
    SliceProducts,
    manifest,
    manifest_due,
    progress,
    record_finish,
    slice_period_s,
)
from kintsugi_daemon.states.disk import DiskReserve
from kintsugi_daemon.states.guards import GuardReading, Guards
from kintsugi_daemon.states.latest_state import LatestState
from kintsugi_daemon.states.preflight import preflight_problem
from kintsugi_daemon.states.run import INTERRUPTING, ActiveRun, CommandRefused, Interrupted, Refused
from kintsugi_daemon.states.segmentation import SegmentationPipeline
from kintsugi_daemon.states.step_journal import Completions, record_failure
from kintsugi_daemon.states.table import build_machine, destination

__all__ = ["ActiveRun", "CommandRefused", "Controller"]

log = structlog.get_logger("kintsugi.controller")

SAFE_STATE_DEADLINE_S = 60.0


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
        self.step: str | None = None
        self.pause_requested = False
        self.stop_requested = False
        self.alert_board = Alerts(journal, self._run_id, lambda: self.on_change())
        self.products = SliceProducts(journal)
        self.segmentation = SegmentationPipeline(
            journal, self.alert_board, self.products, lambda: self.on_change()
        )
        self._task: asyncio.Task[None] | None = None
        self._interrupt: str | None = None  # "pause" | "abort" | "halt" while an immediate stop is in flight
        self._wake = asyncio.Event()
        self._guards: Guards | None = None
        self.latest = LatestState(instrument)
        self._final_progress: dict[str, Any] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self.completions = Completions(journal)
        self.reserve = DiskReserve(settings.data_root)

    @property
    def alerts(self) -> dict[str, dict[str, Any]]:
        return self.alert_board.active

    @property
    def latest_slice(self) -> dict[str, Any] | None:
        return self.products.latest

    @property
    def last_metrics(self) -> dict[str, Any]:
        return self.products.last_metrics

    def _run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    # --- machine plumbing -------------------------------------------------------------------------

    def has_active_run(self) -> bool:
        return self.run is not None

    async def may(self, trigger: str) -> bool:
        """Whether the table allows `trigger` now (transitions adds a `may_<trigger>` per trigger)."""
        return bool(await getattr(self, f"may_{trigger}")())

    async def fire(
        self,
        trigger: str,
        *,
        reason: str | None = None,
        events: list[EventDraft] | None = None,
        event_type: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Journal the new state with its events, then take the transition (refused ones change nothing)."""
        if not await self.may(trigger):
            raise CommandRefused(f"{trigger} is not allowed in state {self.state}")
        run_id = self._run_id()
        drafts = list(events or [])
        if event_type is not None:
            drafts.append(EventDraft(type=event_type, data={"reason": reason, **(data or {})}, run_id=run_id))
        dest = destination(self.machine, trigger, self.state, active_run=self.has_active_run())
        with self.journal.transaction():
            self.completions.flush()
            self.journal.set_state(dest, reason, run_id, events=drafts)
        await getattr(self, trigger)()
        if self.run is not None and trigger in INTERRUPTING:
            self.run.slice_interrupted = True
        self.reason = reason
        self.since = time.time()
        log.info("state", state=self.state, trigger=trigger, reason=reason, run_id=run_id)
        self.on_change()

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "since": self.since,
            "run_id": self.run.run_id if self.run else None,
            "step": self.step,
        }

    def progress(self) -> dict[str, Any] | None:
        """The run's progress; after it ends, its final figures (until the next run) so the retained
        topic never stays at a slice the publisher's coalescing skipped."""
        return self._final_progress if self.run is None else progress(self.run, self.step)

    # --- start-up and recovery --------------------------------------------------------------------

    async def boot(self) -> None:
        record = self.journal.active_run()
        if record is None:
            await self.fire("booted", reason="started")
            return
        self.run = recovery.load_run(self.journal, self.settings.data_root, record)
        await self.fire("recover", reason="recovered", event_type="recovering")
        try:
            await recovery.reconcile_open_steps(self.journal, self.instrument, self.run)
        except InstrumentError as exc:
            await self._fault(exc, where="recovery")
            return
        await self.fire(
            "recovered", reason="recovered", event_type="paused", data={"next_slice": self.run.next_slice}
        )

    # --- commands and shutdown --------------------------------------------------------------------

    async def command(self, verb: str, args: dict[str, Any]) -> dict[str, Any]:
        """Carry out an operator command; raise CommandRefused (changing nothing) when it cannot be."""
        self._wake.set()
        return await commands.handle(self, verb, args)

    def run_loop_active(self) -> bool:
        return self._task is not None and not self._task.done()

    async def shutdown(self, wait_s: float) -> None:
        """SIGTERM: pause at the next step boundary (the run stays resumable), stopping the step if it
        does not finish within `wait_s`."""
        if self._task is None or self._task.done():
            return
        self.pause_requested = True
        if self.state.startswith("running"):
            await self.fire("pause", reason="shutdown", event_type="pausing")
        try:
            await asyncio.wait_for(asyncio.shield(self._task), wait_s)
        except TimeoutError:
            await self.stop_instrument("pause")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), 60.0)

    async def close(self) -> None:
        """Cancel every task this controller runs (after shutdown, or when a test ends)."""
        tasks = [t for t in (self._task, self._guard_task, *self.segmentation.tasks()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.completions:
            with self.journal.transaction():
                self.completions.flush()

    async def stop_instrument(self, why: str) -> None:
        self._interrupt = why
        with contextlib.suppress(InstrumentError):
            await self.instrument.stop(deadline_s=10.0)
        self._wake.set()

    async def safe_state(self) -> None:
        try:
            result = await self.instrument.safe_state(deadline_s=SAFE_STATE_DEADLINE_S)
            log.info("safe_state", **result.model_dump())
        except InstrumentError as exc:
            self.alert_board.raise_(
                "safe_state_failed", "critical", f"could not put the instrument in a safe state: {exc}"
            )

    # --- the run ----------------------------------------------------------------------------------

    def launch(self) -> None:
        self.reserve.ensure()
        self._task = asyncio.create_task(self._supervise(), name="kintsugi-run")

    async def relaunch(self) -> None:
        """Start the run loop again (after pause, suspension, fault or recovery); the old one is ending."""
        if self._task is not None and not self._task.done():
            await asyncio.wait_for(asyncio.shield(self._task), 30.0)
        self.launch()

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
            if self.reserve.release_if_full(exc) and await self._suspend_for_guards():
                return  # a full disk met outside a step (a journal commit): the disk guard, not a fault
            log.exception("run loop failed")
            await self._fault(exc, where=self.step or "run")

    async def _fault(self, exc: BaseException, *, where: str) -> None:
        message = f"{where}: {type(exc).__name__}: {exc}"
        self.alert_board.raise_("fault", "critical", message)
        if await self.may("fault"):
            await self.fire(
                "fault", reason=message, event_type="fault", data={"step": where, "error": type(exc).__name__}
            )
        await self.safe_state()

    async def _run_loop(self) -> None:
        run = self.run
        assert run is not None
        if self.state == "preflight":
            try:
                await self._preflight()
            except Refused:
                return
        elif self._guards is None:
            self._guards = Guards(run.recipe.guards)
        await self.segmentation.catch_up(run)
        self.latest.forget()  # a new loop (start, resume, recovery): read the instrument afresh
        while True:
            if await self._boundary():
                return
            plan = self._next_step()
            if plan is None:
                await self.end_run("done")
                return
            index, step = plan
            try:
                await self._execute(index, step)
            except CommandRefused:
                continue  # a command moved the machine meanwhile; the boundary handles it
            except Interrupted:
                continue  # the boundary decides: paused, aborted or halted
            except AdaptSuspended as exc:
                await adapting.suspend_run(self, exc)
                continue  # the boundary ends the loop; `resume` (by the operator) goes on
            except (InstrumentFault, CommsLost, DeadlineExceeded) as exc:
                if await self._suspend_for_guards():
                    continue
                await self._fault(exc, where=step)
                return

    async def _preflight(self) -> None:
        run = self.run
        assert run is not None
        self._guards = Guards(run.recipe.guards)
        problem = await preflight_problem(self.instrument, self.journal, run, self.segmentation)
        if problem is not None:
            await self.fire("preflight_failed", reason=problem, event_type="run_refused")
            self.alert_board.raise_("preflight", "warning", problem)
            record_finish(self.journal, run, "aborted", {"how": "refused", "reason": problem, "slices": 0})
            self.run = None
            raise Refused()

    def _next_step(self) -> tuple[int, str] | None:
        run = self.run
        assert run is not None
        if run.next_slice >= run.total or run.adapt.stop_before(run.next_slice) is not None:
            return None
        done = {r.step for r in self.journal.steps(run.run_id, run.next_slice) if r.ok}
        done |= self.completions.steps_of(run.next_slice)
        if self.segmentation.running(run.next_slice):
            done.add("segment")  # running in the background; its own task journals the result
        for step in steps.planned(run, run.next_slice):
            if step not in done:
                return run.next_slice, step
        return None

    async def _boundary(self) -> bool:
        """Between steps: honour pause, stop, abort and halt, and the guards. True: the loop must end."""
        interrupt, self._interrupt = self._interrupt, None
        if self.state == "aborting" or interrupt == "abort":
            await self.end_run("aborted")
            return True
        if self.state == "faulted":
            return True
        if self.stop_requested and self._slice_boundary():
            await self.end_run("stopped")
            return True
        if (
            self.pause_requested and self.state in ("pausing", "running", "resuming")
        ) or self.state == "pausing":
            self.pause_requested = False
            await self.segmentation.drain()  # a paused run has every finished slice segmented
            await self.fire("paused", reason=self.reason or "operator", event_type="paused")
        if self.state in ("paused", "suspended"):
            return True  # the loop ends; `resume` launches it again
        return await self._suspend_for_guards()

    def _slice_boundary(self) -> bool:
        run = self.run
        assert run is not None
        if self.completions.steps_of(run.next_slice):
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
            self.alert_board.raise_(f"guard_{r.name}", "warning", r.message)
        if self.state != "suspended":
            names = ", ".join(sorted(self._guards.tripped))
            await self.fire(
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
            state = await self.latest.get()
        except InstrumentError:
            return None
        needs_gis = "deposit_pt" in steps.planned(self.run, self.run.next_slice)
        free = self.run.storage.free_bytes() - self.reserve.missing_bytes  # the reserve counts as used
        readings = self._guards.evaluate(state, free, needs_gis=needs_gis)
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
                    self.alert_board.clear(name)
            if settled:
                await self.fire("resume", reason="guards clear", event_type="resumed")
                await self.relaunch()
                return

    async def end_run(self, how: str) -> None:
        run = self.run
        assert run is not None
        await self.segmentation.drain()
        with self.journal.transaction():
            self.completions.flush()
        record_finish(self.journal, run, how, {"how": how, "slices": run.next_slice, "total": run.total})
        self._final_progress = progress(run, None)
        await self.fire("finish", reason=how, event_type="done", data={"slices": run.next_slice})
        self.step = None
        self.run = None

    # --- one step ---------------------------------------------------------------------------------

    async def _execute(self, index: int, step: str) -> None:
        run = self.run
        assert run is not None
        # Every log line of this step carries the run, slice and step (structlog context of the run task).
        structlog.contextvars.bind_contextvars(run_id=run.run_id, slice=index, step=step)
        reason = self.reason if self.state == "stopping" else None
        spec = steps.spec(step)
        if spec.runner == "segmentation":
            await self.fire("begin_segment", reason=reason)
            self.step = step
            images = run.acquisition.images if run.acquisition is not None else None
            await self.segmentation.launch(run, index, images)
            self.on_change()
        elif spec.runner == "checkpoint":
            await self._checkpoint(run, index, reason)
        else:
            await self._on_instrument(run, index, step, spec, reason)

    async def _on_instrument(
        self, run: ActiveRun, index: int, step: str, spec: steps.StepSpec, reason: str | None
    ) -> None:
        params: dict[str, Any] = {"slice": index}
        request: steps.Request | None = None
        if spec.build is not None:
            state = await self.latest.get()
            if recovery.earlier_attempt_took_effect(self.journal, run, index, step, state):
                return
            run.face_m = state.face_position_m
            # Built once: the intent journals exactly the object the instrument is sent.
            recipe = run.slice_recipe(index)  # the adaptive settings of this slice, in recipe fields
            request = spec.build(
                recipe, recovery.remaining_thickness(self.journal, run, index, state, recipe)
            )
            params |= steps.before(state) | {"request": request.model_dump(mode="json")}
        if spec.prepare is not None:
            spec.prepare(run)
        # The state change and the intent share one transaction: one fsync, and never one without the other.
        with self.journal.transaction():
            step_id = self.journal.begin_step(
                run.run_id,
                index,
                step,
                params,
                events=[EventDraft("step_started", {"slice": index, "step": step}, run_id=run.run_id)],
            )
            await self.fire(f"begin_{step}", reason=reason)
        self.step = step
        t0 = time.monotonic()
        assert spec.perform is not None
        try:
            ctx = steps.StepContext(
                self.instrument, run, index, request, self.latest.fresh(), self.segmentation.wait
            )
            result = await spec.perform(ctx)
        except (InstrumentError, OSError, sqlite3.Error, AdaptSuspended) as exc:  # Aborted: InstrumentError
            self.latest.forget()
            full = self.reserve.release_if_full(exc)  # room to journal the failure and the suspension
            if not full and not isinstance(exc, (InstrumentError, AdaptSuspended)):
                raise
            record_failure(self.journal, run.run_id, index, step, step_id, exc)
            if isinstance(exc, AdaptSuspended):
                raise
            if isinstance(exc, Aborted) or self._interrupt is not None:
                raise Interrupted() from exc
            if full:
                raise InstrumentFault(f"disk full: {exc}") from exc
            raise
        result["duration_s"] = round(time.monotonic() - t0, 4)
        # Only an operation's own answer says how it left the instrument; a step without one forgets.
        self.latest.remember(result.pop("state", None))
        # Committed with the next state change (the next step's intent, a pause, a fault...).
        extra = spec.events(run.run_id, index, result) if spec.events is not None else []
        self.completions.hold(run.run_id, index, step, step_id, result, extra)
        self.on_change()

    async def _checkpoint(self, run: ActiveRun, index: int, reason: str | None) -> None:
        """The slice is done: state, held-back completions and the checkpoint in one transaction."""
        profiling.record("slice_end", time.monotonic(), time.monotonic())  # the overhead benchmark's clock
        period = slice_period_s(self.journal, run, index)
        result = {"face_position_m": run.face_m}
        with self.journal.transaction():
            await self.fire("begin_checkpoint", reason=reason)
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
        run.record_period(period)
        self.products.checkpointed(run, index)
        if manifest_due(run):
            run.storage.write_manifest(manifest(run, None))
        self.on_change()
