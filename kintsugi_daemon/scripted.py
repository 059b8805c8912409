"""A fixed kintsugi cycle driven through any DualBeam: deposit Pt every k slices, mill, polish, image.

This is the schedule Auto Slice & View runs (constant thickness, Pt on a fixed period), with the
cross-section y-correction done by beam shift. The simulator's dataset export and the demo both drive
it; the daemon's state machine replaces it with supervised, journaled steps.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    BeamShift,
    DepositRequest,
    DepositResult,
    DetectorName,
    DetectorSettings,
    DualBeam,
    IonBeamSettings,
    MillRequest,
    MillResult,
    PolishRequest,
    Rectangle,
)

__all__ = ["CyclePlan", "SliceOutcome", "run_cycle"]

SEM_FIB_ANGLE_DEG = 52.0


@dataclass(frozen=True)
class CyclePlan:
    slices: int
    detectors: tuple[DetectorName, ...] = ("cbs", "tld")
    width_px: int = 1536
    height_px: int = 1024
    pixel_size_m: float = 40e-9
    dwell_s: float = 3e-6
    voltage_v: float = 5_000.0
    imaging_current_a: float = 5e-9
    slice_thickness_m: float = 40e-9
    mill_current_a: float = 15e-9
    polish_current_a: float = 1e-9
    species: Literal["xe", "o", "ar", "n"] = "xe"
    pt_every: int = 1  # 0: never deposit
    pt_thickness_m: float = 100e-9
    pt_beam: Literal["electron", "ion"] = "electron"
    geometry: Literal["cross_section", "planar"] = "cross_section"
    y_correction: bool = True
    area: Rectangle = field(
        default_factory=lambda: Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=65e-6, height_m=55e-6)
    )

    def __post_init__(self) -> None:
        if self.slices < 1:
            raise ValueError("slices must be >= 1")
        if self.pt_every < 0:
            raise ValueError("pt_every must be >= 0")

    def acquire_request(self) -> AcquireRequest:
        return AcquireRequest(
            detectors=[DetectorSettings(name=d) for d in self.detectors],
            width_px=self.width_px,
            height_px=self.height_px,
            pixel_size_m=self.pixel_size_m,
            dwell_s=self.dwell_s,
            voltage_v=self.voltage_v,
            current_a=self.imaging_current_a,
        )


@dataclass(frozen=True)
class SliceOutcome:
    index: int
    deposit: DepositResult | None
    mill: MillResult
    polish: MillResult
    acquisition: Acquisition


async def run_cycle(instrument: DualBeam, plan: CyclePlan) -> AsyncIterator[SliceOutcome]:
    """Yield each slice as soon as its images are in; the caller stores them before asking for more."""
    await instrument.set_ion_beam(
        IonBeamSettings(species=plan.species, current_a=plan.mill_current_a, voltage_v=30_000.0)
    )
    request = plan.acquire_request()
    tan_recession = math.tan(math.radians(90.0 - SEM_FIB_ANGLE_DEG))
    for index in range(plan.slices):
        deposit = None
        if plan.pt_every and index % plan.pt_every == 0:
            deposit = await instrument.deposit_pt(
                DepositRequest(area=plan.area, thickness_m=plan.pt_thickness_m, beam=plan.pt_beam)
            )
        milled = await instrument.mill(
            MillRequest(
                pattern="cleaning_cross_section",
                area=plan.area,
                slice_thickness_m=plan.slice_thickness_m,
                current_a=plan.mill_current_a,
                species=plan.species,
            )
        )
        polished = await instrument.polish(
            PolishRequest(area=plan.area, current_a=plan.polish_current_a, species=plan.species)
        )
        if plan.y_correction and plan.geometry == "cross_section":
            # Keep the same region in view as the face recedes (the beam meets it lower each slice).
            shift_y = -polished.face_position_m * tan_recession
            await instrument.set_beam_shift(BeamShift(x_m=0.0, y_m=max(shift_y, -10e-6)))
        acquisition = await instrument.acquire(request)
        yield SliceOutcome(index, deposit, milled, polished, acquisition)
