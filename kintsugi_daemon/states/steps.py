"""The steps of one kintsugi slice, as instrument calls, and how a step interrupted by a crash is judged.

Each destructive step records in its intent what the instrument looked like before it (face position,
Pt cap thickness), so after a crash the daemon can tell from the instrument's state whether the step
happened, instead of guessing (and milling a slice twice).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    BeamShift,
    DepositRequest,
    DetectorSettings,
    DualBeam,
    InstrumentState,
    MillRequest,
    PolishRequest,
    Rectangle,
)
from kintsugi_daemon.instrument import POLISH_REMOVAL_M, SEM_FIB_ANGLE_DEG

__all__ = [
    "DESTRUCTIVE",
    "Reconciliation",
    "SliceOutcome",
    "acquire_request",
    "deposit",
    "fixed_schedule",
    "image",
    "mill",
    "polish",
    "reconcile",
    "steps_for_slice",
]

DESTRUCTIVE = frozenset({"deposit_pt", "mill", "polish"})


def steps_for_slice(recipe: Recipe, index: int) -> list[str]:
    """The fixed schedule (Auto Slice & View): Pt every k slices, mill, polish, image, segment, adapt."""
    steps = []
    if recipe.pt.every_slices and index % recipe.pt.every_slices == 0:
        steps.append("deposit_pt")
    steps.append("mill")
    if recipe.polish.passes:
        steps.append("polish")
    steps.append("image")
    if recipe.segmentation.enabled:
        steps.append("segment")
    steps += ["adapt", "checkpoint"]
    return steps


def _area(recipe: Recipe) -> Rectangle:
    roi = recipe.roi
    return Rectangle(
        center_x_m=roi.center_x_m, center_y_m=roi.center_y_m, width_m=roi.width_m, height_m=roi.height_m
    )


def before(state: InstrumentState) -> dict[str, float]:
    """What a destructive step's intent records about the instrument beforehand."""
    return {"face_before_m": state.face_position_m, "cap_before_m": state.pt_cap_thickness_m}


async def deposit(instrument: DualBeam, recipe: Recipe) -> dict[str, Any]:
    pt = recipe.pt
    result = await instrument.deposit_pt(
        DepositRequest(
            area=_area(recipe),
            thickness_m=pt.thickness_m,
            beam=pt.beam,
            gis_temperature_k=pt.gis_temperature_k,
        )
    )
    return result.model_dump()


async def mill(instrument: DualBeam, recipe: Recipe, thickness_m: float) -> dict[str, Any]:
    m = recipe.mill
    result = await instrument.mill(
        MillRequest(
            pattern=m.pattern,
            area=_area(recipe),
            slice_thickness_m=thickness_m,
            current_a=m.current_a,
            species=m.species,
            application=m.application,
        )
    )
    return result.model_dump()


async def polish(instrument: DualBeam, recipe: Recipe) -> dict[str, Any]:
    p = recipe.polish
    result = await instrument.polish(
        PolishRequest(
            area=_area(recipe),
            current_a=p.current_a,
            species=recipe.mill.species,
            rocking_deg=p.rocking_deg,
            passes=p.passes,
        )
    )
    return result.model_dump()


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


async def image(instrument: DualBeam, recipe: Recipe) -> Acquisition:
    if recipe.imaging.y_correction and recipe.run.geometry == "cross_section":
        # The beam meets the receding face lower each slice; shift it back to keep the region in view.
        state = await instrument.state()
        shift_y = -state.face_position_m * math.tan(math.radians(90.0 - SEM_FIB_ANGLE_DEG))
        limit = state.beam_shift_limit_m
        await instrument.set_beam_shift(
            BeamShift(x_m=state.beam_shift.x_m, y_m=max(min(shift_y, limit), -limit))
        )
    return await instrument.acquire(acquire_request(recipe))


@dataclass(frozen=True)
class SliceOutcome:
    index: int
    deposit: dict[str, Any] | None
    mill: dict[str, Any]
    polish: dict[str, Any] | None
    acquisition: Acquisition


async def fixed_schedule(instrument: DualBeam, recipe: Recipe) -> AsyncIterator[SliceOutcome]:
    """The recipe's slices with the same step functions the daemon runs, without journal or state machine
    (the simulator's dataset export). Each slice is yielded as soon as its images are in."""
    for index in range(recipe.run.total_slices):
        planned = steps_for_slice(recipe, index)
        dep = await deposit(instrument, recipe) if "deposit_pt" in planned else None
        milled = await mill(instrument, recipe, recipe.run.slice_thickness_m)
        polished = await polish(instrument, recipe) if "polish" in planned else None
        yield SliceOutcome(index, dep, milled, polished, await image(instrument, recipe))


@dataclass(frozen=True)
class Reconciliation:
    happened: bool
    evidence: dict[str, Any]


def reconcile(step: str, params: dict[str, Any], state: InstrumentState) -> Reconciliation:
    """Did an interrupted destructive step take effect? Judged from the instrument, not assumed."""
    if step == "mill":
        removed = state.face_position_m - float(params["face_before_m"])
        happened = removed >= 0.5 * float(params["thickness_m"])
        return Reconciliation(happened, {"removed_m": removed, "face_position_m": state.face_position_m})
    if step == "polish":
        removed = state.face_position_m - float(params["face_before_m"])
        return Reconciliation(
            removed >= 0.5 * POLISH_REMOVAL_M * int(params["passes"]), {"removed_m": removed}
        )
    if step == "deposit_pt":
        grown = state.pt_cap_thickness_m - float(params["cap_before_m"])
        return Reconciliation(grown >= 0.5 * float(params["thickness_m"]), {"cap_grown_m": grown})
    return Reconciliation(False, {"note": "non-destructive step: repeated"})
