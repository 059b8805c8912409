"""The steps of one kintsugi slice as a registry: step name -> how it runs, builds its request, is judged.

A destructive step (deposit, mill, polish) builds its request object once; the controller journals exactly
that object (with what the instrument looked like before) as the intent and sends that same object. After
a crash, the step's `reconcile` reads the journaled request back and tells from the instrument's state
whether the step happened, instead of guessing (and milling a slice twice).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kintsugi_daemon.adapt import fixed
from kintsugi_daemon.adapt.observations import SliceSettings
from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    AutoFunctionRequest,
    BeamShift,
    DepositRequest,
    DetectorSettings,
    DualBeam,
    InstrumentState,
    MillRequest,
    PolishRequest,
    Rectangle,
    StageMove,
)
from kintsugi_daemon.estimate import slice_bytes
from kintsugi_daemon.instrument import POLISH_REMOVAL_M, SEM_FIB_ANGLE_DEG
from kintsugi_daemon.service import profiling
from kintsugi_daemon.service.journal import EventDraft
from kintsugi_daemon.states import adapting
from kintsugi_daemon.states.run import ActiveRun

__all__ = [
    "REGISTRY",
    "Reconciliation",
    "Request",
    "StepContext",
    "StepSpec",
    "UnknownStep",
    "acquire_request",
    "before",
    "deposit_request",
    "image",
    "journaled_request",
    "mill_request",
    "planned",
    "polish_request",
    "spec",
    "steps_for_slice",
]

Request = DepositRequest | MillRequest | PolishRequest
# Who runs a step: the journaled instrument path, the background segmentation pipeline, or the
# slice's checkpoint transaction.
Runner = Literal["instrument", "segmentation", "checkpoint"]


class UnknownStep(KeyError):
    """A step name with no registry entry: a programming error, never skipped."""


@dataclass(frozen=True)
class Reconciliation:
    happened: bool
    evidence: dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """What a step's `perform` works with: the instrument, the run, the slice, and its built request."""

    instrument: DualBeam
    run: ActiveRun
    index: int
    request: Request | None = None
    state: InstrumentState | None = None  # the instrument's state as last seen, when still fresh
    wait_segmented: Callable[[int], Awaitable[None]] | None = None  # until a slice's segmentation is done


@dataclass(frozen=True)
class StepSpec:
    runner: Runner
    perform: Callable[[StepContext], Awaitable[dict[str, Any]]] | None = None
    # Destructive steps only: the request (recipe, thickness left of this slice) and the verdict on it.
    build: Callable[[Recipe, float], Request] | None = None
    reconcile: Callable[[Any, Mapping[str, Any], InstrumentState], Reconciliation] | None = None
    request_model: type[Request] | None = None
    # Intents journaled before they held the request named its figures flat: old key -> request field.
    legacy_fields: Mapping[str, str] = field(default_factory=dict)
    # A check before the intent is journaled (raises to refuse the step, e.g. no room for the images).
    prepare: Callable[[ActiveRun], None] | None = None
    # Events beside `step_completed`, committed with the completion (the adapt step's `adapted`).
    events: Callable[[str, int, dict[str, Any]], list[EventDraft]] | None = None

    @property
    def destructive(self) -> bool:
        return self.build is not None


def steps_for_slice(recipe: Recipe, index: int, settings: SliceSettings | None = None) -> list[str]:
    """A slice's steps: deposit Pt, mill, polish, image, segment, adapt, checkpoint. Without `settings`
    the fixed schedule (Auto Slice & View: Pt every k slices); with them, as the slice's settings say
    (the adaptive loop's, which follow the same schedule under the fixed policy). An adaptive run that
    corrects drift mills its fiducial before the first slice."""
    steps = []
    if settings is not None:
        adaptive = recipe.adapt.policy == "adaptive"
        if adaptive and recipe.adapt.drift.enabled and index == 0:
            steps.append("mill_fiducial")
        deposit, polish = settings.deposit_pt, settings.polish_passes
    else:
        deposit = bool(recipe.pt.every_slices) and index % recipe.pt.every_slices == 0
        polish = recipe.polish.passes
    if deposit:
        steps.append("deposit_pt")
    steps.append("mill")
    if polish:
        steps.append("polish")
    steps.append("image")
    if recipe.segmentation.enabled:
        steps.append("segment")
    steps += ["adapt", "checkpoint"]
    return steps


def planned(run: ActiveRun, index: int) -> list[str]:
    """The steps of slice `index` of this run, as its settings say."""
    return steps_for_slice(run.recipe, index, run.adapt.settings_for(index))


def spec(step: str) -> StepSpec:
    try:
        return REGISTRY[step]
    except KeyError:
        raise UnknownStep(f"no step {step!r} in the registry (known: {', '.join(REGISTRY)})") from None


def before(state: InstrumentState) -> dict[str, float]:
    """What a destructive step's intent records about the instrument beforehand."""
    return {"face_before_m": state.face_position_m, "cap_before_m": state.pt_cap_thickness_m}


def journaled_request(step: StepSpec, params: Mapping[str, Any]) -> Any:
    """The request an intent recorded; for an intent of an earlier daemon, the figures it had."""
    assert step.request_model is not None
    if "request" in params:
        return step.request_model.model_validate(params["request"])
    # Unvalidated on purpose: only the fields `reconcile` reads exist.
    return step.request_model.model_construct(**{new: params[old] for old, new in step.legacy_fields.items()})


# --- requests -------------------------------------------------------------------------------------


def _area(recipe: Recipe) -> Rectangle:
    roi = recipe.roi
    return Rectangle(
        center_x_m=roi.center_x_m, center_y_m=roi.center_y_m, width_m=roi.width_m, height_m=roi.height_m
    )


def deposit_request(recipe: Recipe) -> DepositRequest:
    pt = recipe.pt
    return DepositRequest(
        area=_area(recipe), thickness_m=pt.thickness_m, beam=pt.beam, gis_temperature_k=pt.gis_temperature_k
    )


def mill_request(recipe: Recipe, thickness_m: float) -> MillRequest:
    m = recipe.mill
    return MillRequest(
        pattern=m.pattern,
        area=_area(recipe),
        slice_thickness_m=thickness_m,
        current_a=m.current_a,
        species=m.species,
        application=m.application,
    )


def polish_request(recipe: Recipe) -> PolishRequest:
    p = recipe.polish
    return PolishRequest(
        area=_area(recipe),
        current_a=p.current_a,
        species=recipe.mill.species,
        rocking_deg=p.rocking_deg,
        passes=p.passes,
    )


def acquire_request(recipe: Recipe) -> AcquireRequest:
    img = recipe.imaging
    return AcquireRequest(
        detectors=[DetectorSettings(name=d) for d in img.detectors],
        width_px=img.width_px,
        height_px=img.height_px,
        pixel_size_m=img.pixel_size_m,
        dwell_s=img.dwell_s,
        line_integration=img.line_integration,
        voltage_v=img.voltage_v,
        current_a=img.current_a,
    )


async def image(
    instrument: DualBeam,
    recipe: Recipe,
    state: InstrumentState | None = None,
    settings: SliceSettings | None = None,
    stage_target: tuple[float, float] | None = None,
) -> Acquisition:
    """Image the face. With adaptive `settings`: the stage move (to an absolute target, so a repeat after a
    crash does not move twice), the drift correction on top of the y-correction as one whole beam-shift
    point, then autofocus / autostigmation / auto contrast-brightness when decided, then the frame.
    `state` is the instrument's state as last seen, when still fresh (a stage move changes neither the face
    position nor the beam shift it is read for)."""
    if stage_target is not None:
        await instrument.move_stage(StageMove(mode="absolute", x_m=stage_target[0], y_m=stage_target[1]))
    y_corrected = recipe.imaging.y_correction and recipe.run.geometry == "cross_section"
    if y_corrected or settings is not None:
        state = state or await instrument.state()
        # The beam meets the receding face lower each slice; shift it back to keep the region in view.
        y = -state.face_position_m * math.tan(math.radians(90.0 - SEM_FIB_ANGLE_DEG)) if y_corrected else 0.0
        x = state.beam_shift.x_m if settings is None else settings.beam_shift_offset_x_m
        if settings is not None:
            y += settings.beam_shift_offset_y_m
        elif not y_corrected:
            y = state.beam_shift.y_m
        limit = state.beam_shift_limit_m
        await instrument.set_beam_shift(
            BeamShift(x_m=max(min(x, limit), -limit), y_m=max(min(y, limit), -limit))
        )
    if settings is not None:
        if settings.auto_focus:
            await instrument.auto_function(AutoFunctionRequest(function="focus"))
        if settings.auto_stigmation:
            await instrument.auto_function(AutoFunctionRequest(function="stigmation"))
        if settings.auto_contrast_brightness:
            for detector in recipe.imaging.detectors:
                await instrument.auto_function(
                    AutoFunctionRequest(function="contrast_brightness", detector=detector)
                )
    return await instrument.acquire(acquire_request(recipe))


# --- perform --------------------------------------------------------------------------------------


async def _deposit(ctx: StepContext) -> dict[str, Any]:
    assert isinstance(ctx.request, DepositRequest)
    result = (await ctx.instrument.deposit_pt(ctx.request)).model_dump()
    ctx.run.adapt.deposited(ctx.index, float(result["infiltration_depth_m"]))
    return result


async def _mill(ctx: StepContext) -> dict[str, Any]:
    assert isinstance(ctx.request, MillRequest)
    return (await ctx.instrument.mill(ctx.request)).model_dump()


async def _polish(ctx: StepContext) -> dict[str, Any]:
    assert isinstance(ctx.request, PolishRequest)
    return (await ctx.instrument.polish(ctx.request)).model_dump()


async def _image(ctx: StepContext) -> dict[str, Any]:
    run, index = ctx.run, ctx.index
    if run.storage.slice_complete(index):
        # Written before a crash that beat the journal: the files are the truth, do not re-image.
        return {"files": run.storage.read_slice(index)["files"], "recovered": True}
    if run.recipe.adapt.policy == "adaptive":
        acq = await image(
            ctx.instrument,
            run.slice_recipe(index),
            ctx.state,
            run.adapt.settings_for(index),
            run.adapt.stage_target(index),
        )
    else:
        acq = await image(ctx.instrument, run.recipe, ctx.state)
    with profiling.span("storage"):
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
    after = acq.metadata.state.model_dump(mode="json") if acq.metadata.state is not None else None
    return {
        "files": paths,
        "mean_grey": means,
        "face_position_m": acq.metadata.face_position_m,
        "state": after,
    }


def _room_for_images(run: ActiveRun) -> None:
    run.storage.ensure_space(slice_bytes(run.recipe), run.recipe.guards.min_free_disk_bytes // 2)


async def _adapt(ctx: StepContext) -> dict[str, Any]:
    if ctx.run.recipe.adapt.policy == "fixed":
        return fixed.decide(ctx.run.recipe)
    return await adapting.adapt(ctx.instrument, ctx.run, ctx.index, ctx.wait_segmented)


async def _mill_fiducial(ctx: StepContext) -> dict[str, Any]:
    return (await ctx.instrument.mill_fiducial(adapting.fiducial_request(ctx.run.recipe))).model_dump()


# --- reconcile ------------------------------------------------------------------------------------


def _mill_happened(request: MillRequest, before: Mapping[str, Any], state: InstrumentState) -> Reconciliation:
    removed = state.face_position_m - float(before["face_before_m"])
    happened = removed >= 0.5 * request.slice_thickness_m
    return Reconciliation(happened, {"removed_m": removed, "face_position_m": state.face_position_m})


def _polish_happened(
    request: PolishRequest, before: Mapping[str, Any], state: InstrumentState
) -> Reconciliation:
    removed = state.face_position_m - float(before["face_before_m"])
    return Reconciliation(removed >= 0.5 * POLISH_REMOVAL_M * request.passes, {"removed_m": removed})


def _deposit_happened(
    request: DepositRequest, before: Mapping[str, Any], state: InstrumentState
) -> Reconciliation:
    grown = state.pt_cap_thickness_m - float(before["cap_before_m"])
    return Reconciliation(grown >= 0.5 * request.thickness_m, {"cap_grown_m": grown})


REGISTRY: dict[str, StepSpec] = {
    # Non-destructive for the journal: a repeat after a crash deepens the same mark, it mills no slice.
    "mill_fiducial": StepSpec("instrument", _mill_fiducial),
    "deposit_pt": StepSpec(
        "instrument",
        _deposit,
        lambda recipe, _left_m: deposit_request(recipe),
        _deposit_happened,
        DepositRequest,
        {"thickness_m": "thickness_m"},
    ),
    "mill": StepSpec(
        "instrument", _mill, mill_request, _mill_happened, MillRequest, {"thickness_m": "slice_thickness_m"}
    ),
    "polish": StepSpec(
        "instrument",
        _polish,
        lambda recipe, _left_m: polish_request(recipe),
        _polish_happened,
        PolishRequest,
        {"passes": "passes"},
    ),
    "image": StepSpec("instrument", _image, prepare=_room_for_images),
    "segment": StepSpec("segmentation"),
    "adapt": StepSpec("instrument", _adapt, events=adapting.adapted_events),
    "checkpoint": StepSpec("checkpoint"),
}
