"""Crash reconciliation: a destructive step whose completion the journal lacks is judged from the
instrument (its journaled request against what the instrument shows now), never repeated blindly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from kintsugi_daemon.config import Recipe, parse_recipe
from kintsugi_daemon.drivers.base import DualBeam, InstrumentState
from kintsugi_daemon.service.journal import EventDraft, Journal, RunRecord, StepRecord
from kintsugi_daemon.service.storage import RunStorage
from kintsugi_daemon.states import adapting, steps
from kintsugi_daemon.states.run import ActiveRun

__all__ = [
    "RECONCILE_WAIT_S",
    "earlier_attempt_took_effect",
    "judge",
    "load_run",
    "reconcile_open_steps",
    "remaining_thickness",
]

log = structlog.get_logger("kintsugi.controller")

RECONCILE_WAIT_S = 600.0


def load_run(journal: Journal, data_root: Path, record: RunRecord) -> ActiveRun:
    """The run a restarted daemon finds unfinished in the journal, from the slice after its checkpoint."""
    recipe = parse_recipe(
        (data_root / record.run_id / "recipe.toml").read_text(), f"run {record.run_id} recipe"
    )
    storage = RunStorage(data_root, record.run_id, create=False)
    checkpoint = journal.last_checkpoint(record.run_id)
    next_slice = checkpoint[0] + 1 if checkpoint else 0
    run = ActiveRun(record.run_id, recipe, storage, record.total_slices, next_slice=next_slice)
    adapting.restore(journal, run)
    return run


def judge(rec: StepRecord, state: InstrumentState) -> steps.Reconciliation:
    """Did the journaled step take effect? A non-destructive one is simply repeated."""
    spec = steps.spec(rec.step)
    if spec.reconcile is None:
        return steps.Reconciliation(False, {"note": "non-destructive step: repeated"})
    return spec.reconcile(steps.journaled_request(spec, rec.params), rec.params, state)


async def _wait_idle(instrument: DualBeam) -> InstrumentState:
    """The instrument's state once it finished whatever it was doing when we lost track of it."""
    async with asyncio.timeout(RECONCILE_WAIT_S):
        while True:
            state = await instrument.state()
            if state.busy is None:
                return state
            await asyncio.sleep(0.5)


async def reconcile_open_steps(journal: Journal, instrument: DualBeam, run: ActiveRun) -> None:
    """At start-up: close every step the journal left open, as happened or not, with the evidence."""
    open_steps = journal.open_steps(run.run_id)
    if not open_steps:
        return
    state = await _wait_idle(instrument)
    for rec in open_steps:
        verdict = judge(rec, state)
        event = EventDraft(
            "step_reconciled",
            {"step": rec.step, "slice": rec.slice_index, "happened": verdict.happened, **verdict.evidence},
            run_id=run.run_id,
        )
        result = {"reconciled": True, **verdict.evidence}
        if verdict.happened:
            journal.complete_step(rec.id, result, events=[event])
        else:
            journal.fail_step(rec.id, result, events=[event])
        log.warning("reconciled", step=rec.step, slice=rec.slice_index, happened=verdict.happened)


def _attempts(journal: Journal, run: ActiveRun, index: int, step: str) -> list[StepRecord]:
    return [r for r in journal.steps(run.run_id, index) if r.step == step]


def earlier_attempt_took_effect(
    journal: Journal, run: ActiveRun, index: int, step: str, state: InstrumentState
) -> bool:
    """A destructive step that failed or was cut short may still have happened: ask the instrument."""
    attempts = _attempts(journal, run, index, step)
    if not attempts:
        return False
    first = attempts[0]
    verdict = judge(first, state)
    if not verdict.happened:
        return False
    step_id = journal.begin_step(run.run_id, index, step, {**first.params, "reconciled": True})
    journal.complete_step(
        step_id,
        {"reconciled": True, **verdict.evidence},
        events=[
            EventDraft(
                "step_reconciled",
                {"slice": index, "step": step, "happened": True, **verdict.evidence},
                run_id=run.run_id,
            )
        ],
    )
    return True


def remaining_thickness(
    journal: Journal, run: ActiveRun, index: int, state: InstrumentState, recipe: Recipe | None = None
) -> float:
    """A mill cut short (immediate pause, fault) is finished with only what is left of the slice
    (of `recipe`'s thickness: the slice's own under the adaptive policy)."""
    thickness = (recipe or run.recipe).run.slice_thickness_m
    attempts = _attempts(journal, run, index, "mill")
    if not attempts:
        return thickness
    removed = float(state.face_position_m) - float(attempts[0].params["face_before_m"])
    return max(thickness - removed, run.recipe.run.min_slice_thickness_m)
