"""The adaptive adapt step: observe the slice, run the policies, keep every decision on the record.

Order matters. The observation and the decisions are the adapt step's journaled result and the slice's
`NNNN.adapt.json`; the step's completion (with one `adapted` event per decision) is committed with the
next state change, which comes before the next step touches the instrument: every decision is on the
record before it takes effect. A decision to suspend (lost fiducial), a policy that raises or settings
outside the recipe's bounds suspend the run with an alert (`AdaptSuspended`): it never mills on a guess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from kintsugi_daemon.adapt.decisions import Decision
from kintsugi_daemon.adapt.observations import Observation
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import DualBeam, FiducialRequest
from kintsugi_daemon.instrument import SIN_SEM_FIB
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.states.run import ActiveRun

if TYPE_CHECKING:
    from kintsugi_daemon.states.controller import Controller

__all__ = [
    "AdaptSuspended",
    "adapt",
    "adapted_events",
    "fiducial_request",
    "outside_window",
    "restore",
    "suspend_run",
]

log = structlog.get_logger("kintsugi.controller")

FIDUCIAL_FILL = 0.6  # the mark's share of its window (room for drift before it leaves the window)


class AdaptSuspended(Exception):
    """The run must not go on without the operator: a lost fiducial, a policy error, a bad setting."""

    def __init__(self, reason: str, decisions: list[Decision] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decisions = decisions or []


def fiducial_request(recipe: Recipe) -> FiducialRequest:
    """The mark at the centre of the recipe's fiducial window, sized to fill most of it."""
    d, img = recipe.adapt.drift, recipe.imaging
    px = img.pixel_size_m
    row_m = px / SIN_SEM_FIB if recipe.run.geometry == "cross_section" else px  # face-plane metres per row
    return FiducialRequest(
        offset_x_m=(d.fiducial_x_px + d.fiducial_width_px / 2 - img.width_px / 2) * px,
        offset_y_m=(d.fiducial_y_px + d.fiducial_height_px / 2) * row_m,
        size_m=FIDUCIAL_FILL * min(d.fiducial_width_px * px, d.fiducial_height_px * row_m),
        current_a=recipe.polish.current_a,
        species=recipe.mill.species,
    )


def outside_window(recipe: Recipe) -> tuple[slice, slice] | None:
    """The recipe's fiducial window when the run mills a fiducial there (adaptive, drift correction on),
    else None. The mark is Pt-C and trenches, not specimen: the segmentation labels the window `outside`
    (255), as the phase fractions and the volume ignore it."""
    d = recipe.adapt.drift
    return d.window if recipe.adapt.policy == "adaptive" and d.enabled else None


async def _images(run: ActiveRun, index: int) -> dict[str, np.ndarray]:
    acq = run.acquisition  # this slice's images, unless the daemon restarted since
    if acq is not None:
        return {k: np.asarray(v) for k, v in acq.images.items()}
    return await asyncio.to_thread(read_slice_images, run, index)


def read_slice_images(run: ActiveRun, index: int) -> dict[str, np.ndarray]:
    import tifffile

    record = run.storage.read_slice(index)
    return {
        name: np.asarray(tifffile.imread(run.storage.run_dir / rel))
        for name, rel in record["files"].items()
        if name in run.recipe.imaging.detectors
    }


async def adapt(
    instrument: DualBeam,
    run: ActiveRun,
    index: int,
    wait_segmented: Callable[[int], Awaitable[None]] | None,
) -> dict[str, Any]:
    loop = run.adapt
    if wait_segmented is not None and index > 0 and run.recipe.segmentation.enabled:
        await wait_segmented(index - 1)  # slice i-1's segmentation decides what slice i+1 does (lag 2)
    images = await _images(run, index)
    state = await instrument.state()
    loop.beam_shift_limit_m = state.beam_shift_limit_m
    meta = run.acquisition.metadata if run.acquisition is not None else None
    face = meta.face_position_m if meta is not None else state.face_position_m
    wd = meta.working_distance_m if meta is not None else state.working_distance_m
    # The image measures off the event loop; the history only on it (segmentation results land there too).
    measured = await asyncio.to_thread(loop.measure, index, images)
    observation = loop.record(
        index,
        measured,
        face_position_m=face,
        working_distance_m=wd,
        stage_m=(state.stage.x_m, state.stage.y_m),
    )
    try:
        decisions = loop.decide()
        suspend = [d for d in decisions if d.action == "suspend"]
        if suspend:
            loop.rereference_at = index  # resumed, the run takes the view as it is then
            raise AdaptSuspended(suspend[0].why, decisions)
        upcoming = loop.settings_for(index + 1)  # checks the bounds now, before anything is milled
    except AdaptSuspended:
        raise
    except Exception as exc:  # a policy bug or an out-of-bounds setting: never mill on a guess
        log.exception("adapt failed", slice=index)
        loop.rereference_at = index
        raise AdaptSuspended(f"adaptation failed on slice {index}: {type(exc).__name__}: {exc}") from exc
    record = {
        "slice": index,
        "policy": run.recipe.adapt.policy,
        "observation": observation.model_dump(mode="json"),
        "decisions": [d.model_dump(mode="json") for d in decisions],
        "next_settings": upcoming.model_dump(mode="json"),
        "reference_slice": loop.reference_slice,
    }
    path = await asyncio.to_thread(run.storage.write_adapt, index, record)
    # The state read above is the instrument's as the step ends (adapting moves nothing): the next step's
    # guards need no second read (the controller keeps it as the latest state, never journals it).
    return {
        **record,
        "decisions_taken": len(decisions),
        "files": {"adapt": path},
        "state": state.model_dump(mode="json"),
    }


async def suspend_run(ctl: Controller, exc: AdaptSuspended) -> None:
    """A lost fiducial or a failed policy: suspended with an alert (and the decisions that said so) until
    the operator resumes; no guard watcher resumes it on its own."""
    run = ctl.run
    assert run is not None
    ctl.alert_board.raise_("adapt", "critical", exc.reason)
    decided = {"decisions": [d.model_dump() for d in exc.decisions]}
    events = adapted_events(run.run_id, run.next_slice, decided)
    await ctl.fire("suspend", reason=f"adapt: {exc.reason}", events=events, event_type="suspended")


def adapted_events(run_id: str, index: int, result: dict[str, Any]) -> list[EventDraft]:
    """One `adapted` event per decision (policy, measured, threshold, change, why, slices)."""
    return [EventDraft("adapted", {"slice": index, **d}, run_id=run_id) for d in result.get("decisions", [])]


def restore(journal: Journal, run: ActiveRun) -> None:
    """After a restart: the loop as the journaled adapt steps left it (and the fiducial reference from
    the slice it was taken on), so the run goes on with the same settings and pending decisions."""
    if run.recipe.adapt.policy != "adaptive":
        return
    observations: list[Observation] = []
    decisions: list[Decision] = []
    reference: int | None = None
    for rec in journal.steps(run.run_id):
        if rec.step == "deposit_pt" and rec.ok and rec.result and "infiltration_depth_m" in rec.result:
            run.adapt.deposited(rec.slice_index, float(rec.result["infiltration_depth_m"]))
        if rec.step != "adapt" or not rec.ok or not rec.result or "observation" not in rec.result:
            continue
        observations.append(Observation.model_validate(rec.result["observation"]))
        decisions += [Decision.model_validate(d) for d in rec.result.get("decisions", [])]
        reference = rec.result.get("reference_slice", reference)
    run.adapt.restore(observations, decisions, run.next_slice)
    if reference is not None and run.recipe.adapt.drift.enabled and run.storage.slice_complete(reference):
        run.adapt.set_reference(read_slice_images(run, reference))
        run.adapt.reference_slice = reference
