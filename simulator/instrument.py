"""A simulated Helios Hydra implementing the DualBeam protocol over a voxel specimen.

Instrument state (face position, Pt in the pores ahead of the face, cap, curtaining, drift, focus,
GIS, vacuum, beams, stage) lives here; the physics of each step lives in its own module. Operations are
serialised like the real instrument's, charge instrument time from `timing`, and can be stopped midway:
a stopped mill advances the face only by the fraction it milled, so the face stays consistent.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.drivers.base import Aborted as AbortedError
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    AcquisitionMetadata,
    AutoFunctionRequest,
    AutoFunctionResult,
    BeamShift,
    CommsLost,
    DepositRequest,
    DepositResult,
    EdxRequest,
    EdxResult,
    FiducialRequest,
    FiducialResult,
    GisState,
    InstrumentBusy,
    InstrumentFault,
    InstrumentIdentity,
    InstrumentState,
    InvalidRequest,
    IonBeamSettings,
    IonBeamState,
    MillRequest,
    MillResult,
    PolishRequest,
    SafeStateResult,
    StageMove,
    StagePosition,
    StopResult,
)
from kintsugi_daemon.instrument import (
    AMBIENT_K,
    BEAM_SHIFT_LIMIT_M,
    GIS_MIN_OPERATING_K,
    POLISH_REMOVAL_M,
    SEM_FIB_ANGLE_DEG,
    SIN_SEM_FIB,
)
from simulator.drift import Drift
from simulator.faults import FaultPlan, FaultSpec
from simulator.fiducial import Fiducial, paint_fiducial
from simulator.imaging import (
    DetectorSetting,
    FaceView,
    ImagingConditions,
    auto_contrast_brightness,
    curtain_map,
    render,
    render_edx,
)
from simulator.infiltration import infiltrate, infiltration_factor, ragged_front
from simulator.materials import CANONICAL_CLASSES
from simulator.specimen import Specimen

__all__ = ["DEPTH_AHEAD_VOX", "SimulatedDualBeam", "SimulatorSettings", "check_fault_applicable"]

T = TypeVar("T")

DEPTH_AHEAD_VOX = 128  # planes behind the face the renderer may see through pores (5.1 um at 40 nm)
CAP_EROSION_PER_MILL_M = 2e-9
INFILTRATION_PER_THICKNESS = 5.0  # infiltration depth per deposited thickness (choice; DOMAIN sweep 0.2-5 um)
MAX_INFILTRATION_M = 5e-6
THROAT_RADIUS_M = 40e-9
CURRENT_DROP_FACTOR = 0.6
ASTIGMATISM_WALK_M = 0.5e-6  # astigmatic focal difference random walk per frame


# Verbs that run as an operation (serialised, stoppable): the only ones a `hang` can act on.
OPERATION_VERBS = frozenset(
    {
        "move_stage",
        "set_ion_beam",
        "deposit_pt",
        "mill",
        "polish",
        "mill_fiducial",
        "acquire",
        "auto_function",
        "edx_map",
    }
)
# Faults that act on the one call they fire on, and the verbs where that call can be affected.
_FAULT_VERBS: dict[str, frozenset[str]] = {
    "hang": OPERATION_VERBS | {"any"},
    "stage_move_error": frozenset({"move_stage", "any"}),
}


def check_fault_applicable(spec: FaultSpec) -> None:
    """Refuse a fault armed for a verb that never uses it (it would fire and do nothing)."""
    verbs = _FAULT_VERBS.get(spec.kind)
    if verbs is not None and spec.verb not in verbs:
        raise InvalidRequest(
            f"a {spec.kind} fault cannot act on {spec.verb!r}; it applies to: {', '.join(sorted(verbs))}",
            detail={"field": "verb"},
        )


class _Cancelled(Exception):
    """`_spend` was cancelled (a server deadline) after `fraction` of the work.

    The verb books the part done exactly as on a stop, then `_operation` re-raises the original
    CancelledError so the caller's timeout machinery sees a cancellation.
    """

    def __init__(self, fraction: float, cancel: asyncio.CancelledError) -> None:
        super().__init__(f"cancelled after {fraction:.3f} of the work")
        self.fraction = fraction
        self.cancel = cancel


async def _finish(task: asyncio.Future[T]) -> T:
    """Wait for thread work even if cancelled meanwhile (a thread cannot be interrupted); then re-raise."""
    cancel: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError as exc:
            if task.done() and not task.cancelled():
                result = task.result()
                break
            if task.cancelled():
                raise
            cancel = cancel or exc
    if cancel is not None:
        raise cancel
    return result


@dataclass(frozen=True)
class SimulatorSettings:
    time_scale: float = 1.0  # real seconds per simulated second; 0 = instant
    seed: int = 0
    serial: str = "SIM-0001"
    thermal_drift: bool = True  # off for datasets: with/without-Pt variants spend different times


@dataclass
class _Column:
    species: Literal["xe", "o", "ar", "n"] = "xe"
    current_a: float = 15e-9
    voltage_v: float = 30_000.0
    beam_on: bool = True


@dataclass
class _Face:
    position_m: float = 0.0
    cap_m: float = 1e-6  # protective cap laid down before the run (DOMAIN.md)
    curtain: np.ndarray | None = None
    polish_passes: int = 0
    slice_index: int = 0


@dataclass
class _Optics:
    wd_set_m: float = 4e-3
    astigmatism: float = 0.0
    beam_on: bool = True
    current_a: float = 5e-9
    voltage_v: float = 5_000.0
    brightness: dict[str, float] = field(default_factory=dict)
    contrast: dict[str, float] = field(default_factory=dict)


class SimulatedDualBeam:
    """The DualBeam protocol over a simulated specimen. Not thread-safe; one event loop owns it."""

    def __init__(
        self, specimen: Specimen, settings: SimulatorSettings, faults: list[FaultSpec] | None = None
    ):
        if settings.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.specimen = specimen
        self.settings = settings
        self.voxel_m = specimen.params.voxel_size_m
        self.geometry = specimen.params.geometry
        n0, rows, cols = specimen.materials.shape
        # Lazily zeroed pages: only slabs that ever received Pt take memory.
        self.pt = np.zeros((n0, rows, cols), dtype=bool)
        # Independent streams, so a variant with extra steps (deposits) mills and images the same planes.
        seeds = np.random.SeedSequence(settings.seed).spawn(5)
        self._rng_mill, self._rng_drift, self._rng_jump, self._rng_image, self._rng_curtain = (
            np.random.default_rng(s) for s in seeds
        )
        self.faults = FaultPlan()
        for spec in faults or []:
            self.faults.arm(spec)
        self._column = _Column()
        self._face = _Face()
        self._optics = _Optics()
        self._gis = GisState(inserted=False, heater_on=False, temperature_k=AMBIENT_K, valve_open=False)
        self._stage = StagePosition(
            x_m=0.0,
            y_m=0.0,
            z_m=4e-3,
            tilt_deg=52.0 if self.geometry == "cross_section" else -38.0,
            rotation_deg=0.0,
        )
        self._beam_shift = BeamShift(x_m=0.0, y_m=0.0)
        self._stage0 = self._stage
        self._drift = Drift(self._rng_drift, self._rng_jump, thermal=settings.thermal_drift)
        self.fiducial: Fiducial | None = None
        self.truth: list[dict[str, float]] = []  # per image: what the daemon should have measured
        self._vacuum_ok = True
        self._busy: str | None = None
        self._patterning: Literal["idle", "running", "paused"] = "idle"
        self._stop = asyncio.Event()
        self._instrument_s = 0.0
        self.last_labels: np.ndarray | None = None
        self._last_conditions: ImagingConditions | None = None

    # --- bookkeeping ------------------------------------------------------------------------------

    @property
    def face_index(self) -> int:
        last = int(self.specimen.materials.shape[0]) - 1
        return min(round(self._face.position_m / self.voxel_m), last)

    def _face_view(self) -> FaceView:
        fi = self.face_index
        return FaceView(
            materials=self.specimen.materials[fi : fi + DEPTH_AHEAD_VOX],
            pt=self.pt[fi : fi + DEPTH_AHEAD_VOX],
            voxel_size_m=self.voxel_m,
            geometry=self.geometry,
            pt_source="electron",
        )

    def _fault_gate(self, verb: str, *, tick: bool = True) -> list[FaultSpec]:
        """Apply faults to this call: crash, comms drop, vacuum; return the one-shot faults that fired.

        `tick=False` (stop) counts no armed fault: only an active comms drop or vacuum loss applies.
        """
        now = time.monotonic()
        fired = self.faults.tick(verb, now) if tick else []
        if any(f.kind == "crash" for f in fired):
            os._exit(70)  # a crash drill: no cleanup, no answer, like a power cut of the bridge
        if self.faults.active("comms_drop", now):
            raise CommsLost("simulated link to the microscope PC is down", detail={"verb": verb})
        if self.faults.active("vacuum_loss", now):
            self._vacuum_ok = False
        else:
            self._vacuum_ok = True
        return fired

    def _require_vacuum(self, verb: str) -> None:
        if not self._vacuum_ok:
            raise InstrumentFault(f"{verb}: chamber vacuum lost; beams are off", detail={"verb": verb})

    def _current_factor(self) -> float:
        return CURRENT_DROP_FACTOR if self.faults.active("beam_current_drop", time.monotonic()) else 1.0

    @asynccontextmanager
    async def _operation(self, verb: str) -> AsyncIterator[list[FaultSpec]]:
        """Serialise an operation: busy while it (and any thread work it started) runs.

        A `_Cancelled` escaping the body (after the verb booked the part done) becomes the original
        CancelledError again.
        """
        if self._busy is not None:
            raise InstrumentBusy(f"{verb}: instrument busy with {self._busy}", detail={"busy": self._busy})
        fired = self._fault_gate(verb)
        self._busy = verb
        self._stop.clear()
        try:
            if any(f.kind == "hang" for f in fired):
                await self._stop.wait()  # a hung operation: only stop (or the server's deadline) ends it
                raise AbortedError(f"{verb} was stopped while hung", detail={"verb": verb})
            yield fired
        except _Cancelled as cut:
            raise cut.cancel from None
        finally:
            self._busy = None
            self._patterning = "idle"

    async def _spend(self, simulated_s: float) -> float:
        """Charge instrument time; return the fraction done (1.0, or less when stopped).

        Cancelled (a server deadline), it raises `_Cancelled` carrying the fraction done, so the verb
        books it on the same path as a stop. At time scale 0 the time passes instantly: nothing can stop it.
        """
        real = simulated_s * self.settings.time_scale
        if real <= 0:
            self._instrument_s += simulated_s
            self._drift_walk(simulated_s)
            return 1.0
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=real)
        except TimeoutError:
            self._instrument_s += simulated_s
            self._drift_walk(simulated_s)
            return 1.0
        except asyncio.CancelledError as exc:
            done = min((time.monotonic() - t0) / real, 1.0)
            self._instrument_s += simulated_s * done
            raise _Cancelled(done, exc) from None
        done = min((time.monotonic() - t0) / real, 1.0)
        self._instrument_s += simulated_s * done
        return done

    async def _spend_or_cut(self, simulated_s: float) -> tuple[float, _Cancelled | None]:
        """`_spend`, with a cancellation returned instead of raised: the verb books, then re-raises it."""
        try:
            return await self._spend(simulated_s), None
        except _Cancelled as cut:
            return cut.fraction, cut

    async def _in_thread(self, work: Awaitable[T]) -> T:
        """Thread work that holds the operation (and `busy`) until it really finishes, even if cancelled."""
        return await _finish(asyncio.ensure_future(work))

    def _drift_walk(self, seconds: float) -> None:
        self._drift.advance(seconds)

    def _required_wd_m(self) -> float:
        recession = self._face.position_m
        if self.geometry == "cross_section":
            recession /= math.cos(math.radians(90.0 - SEM_FIB_ANGLE_DEG))
        return 4e-3 + recession

    def _origin_m(self, width_m: float) -> tuple[float, float]:
        """Field-of-view origin on the face: centred, shifted by drift, beam shift, stage and recession."""
        _, _, cols = self.specimen.materials.shape
        x = (cols * self.voxel_m - width_m) / 2.0 - self._stage.x_m
        y = -self._stage.y_m
        if self.geometry == "cross_section":
            # A fixed beam meets a receding face lower down: the y-correction Slice & View applies.
            y += self._face.position_m * math.tan(math.radians(90.0 - SEM_FIB_ANGLE_DEG))
        x += self._beam_shift.x_m - self._drift.position_m[0]
        y += self._beam_shift.y_m - self._drift.position_m[1]
        return (x, y)

    def _fov_error_m(self) -> tuple[float, float]:
        """Where the field of view is against where an ideal run keeps it (no drift, ideal y-correction,
        the stage where it started): the drift residual the daemon leaves."""
        x = self._beam_shift.x_m - self._drift.position_m[0] - (self._stage.x_m - self._stage0.x_m)
        y = self._beam_shift.y_m - self._drift.position_m[1] + (self._stage0.y_m - self._stage.y_m)
        if self.geometry == "cross_section":
            y += self._face.position_m * math.tan(math.radians(90.0 - SEM_FIB_ANGLE_DEG))
        return (x, y)

    # --- identity and state -----------------------------------------------------------------------

    async def identity(self, *, deadline_s: float | None = None) -> InstrumentIdentity:
        self._fault_gate("identity")
        return InstrumentIdentity(
            model="Helios Hydra DualBeam (simulated)",
            serial=self.settings.serial,
            software="kintsugi-sim 0.1",
            simulated=True,
        )

    async def state(self, *, deadline_s: float | None = None) -> InstrumentState:
        self._fault_gate("state")
        factor = self._current_factor()
        col = self._column
        return InstrumentState(
            vacuum="pumped" if self._vacuum_ok else "fault",
            chamber_pressure_pa=2e-4 if self._vacuum_ok else 5.0,
            electron_beam_on=self._optics.beam_on and self._vacuum_ok,
            electron_current_a=self._optics.current_a * factor,
            electron_current_setpoint_a=self._optics.current_a,
            ion_current_setpoint_a=col.current_a,
            electron_voltage_v=self._optics.voltage_v,
            working_distance_m=self._optics.wd_set_m,
            ion_beam_on=col.beam_on and self._vacuum_ok,
            ion=IonBeamState(
                species=col.species,
                current_a=col.current_a * factor,
                voltage_v=col.voltage_v,
                switch_time_s=0.0,
            ),
            gis=self._gis,
            beam_shift=self._beam_shift,
            beam_shift_limit_m=BEAM_SHIFT_LIMIT_M,
            stage=self._stage,
            patterning=self._patterning,
            busy=self._busy,
            face_position_m=self._face.position_m,
            pt_cap_thickness_m=self._face.cap_m,
            instrument_time_s=self._instrument_s,
        )

    # --- motion and beams -------------------------------------------------------------------------

    async def move_stage(self, move: StageMove, *, deadline_s: float | None = None) -> StagePosition:
        async with self._operation("move_stage") as fired:
            self._require_vacuum("move_stage")
            if any(f.kind == "stage_move_error" for f in fired) or self.faults.active(
                "stage_move_error", time.monotonic()
            ):
                raise InstrumentFault(
                    "stage move failed: axis following error", detail={"verb": "move_stage"}
                )
            cur = self._stage.model_dump()
            target = dict(cur)
            for axis in ("x_m", "y_m", "z_m", "tilt_deg", "rotation_deg"):
                value = getattr(move, axis)
                if value is not None:
                    target[axis] = value if move.mode == "absolute" else cur[axis] + value
            try:
                new = StagePosition.model_validate(target)
            except ValueError as exc:
                raise InvalidRequest(
                    f"stage target out of range: {exc}", detail={"field": _first_field(exc)}
                ) from exc
            dist = math.dist((cur["x_m"], cur["y_m"], cur["z_m"]), (new.x_m, new.y_m, new.z_m))
            done, cut = await self._spend_or_cut(
                timing.stage_move_time_s(dist, new.tilt_deg - cur["tilt_deg"])
            )
            if done >= 1.0 and cut is None:
                self._stage = new
                return new
            # Stopped midway: the stage is where the move had got to.
            reached = {k: cur[k] + (v - cur[k]) * done for k, v in new.model_dump().items()}
            self._stage = StagePosition.model_validate(reached)
            if cut is not None:
                raise cut
            raise AbortedError(
                "move_stage stopped midway",
                detail={"verb": "move_stage", "stage": self._stage.model_dump()},
            )

    async def set_ion_beam(
        self, settings: IonBeamSettings, *, deadline_s: float | None = None
    ) -> IonBeamState:
        async with self._operation("set_ion_beam"):
            self._require_vacuum("set_ion_beam")
            col = self._column
            t = timing.ion_switch_time_s(settings.species != col.species, settings.current_a != col.current_a)
            if await self._spend(t) < 1.0:  # the column keeps its old settings
                raise AbortedError("set_ion_beam stopped", detail={"verb": "set_ion_beam"})
            col.species, col.current_a, col.voltage_v = (
                settings.species,
                settings.current_a,
                settings.voltage_v,
            )
            return IonBeamState(
                species=col.species,
                current_a=col.current_a * self._current_factor(),
                voltage_v=col.voltage_v,
                switch_time_s=t,
            )

    async def set_beam_shift(self, shift: BeamShift, *, deadline_s: float | None = None) -> BeamShift:
        self._fault_gate("set_beam_shift")
        for axis in ("x_m", "y_m"):
            if abs(getattr(shift, axis)) > BEAM_SHIFT_LIMIT_M:
                raise InvalidRequest(
                    f"beam shift {axis} beyond the +-{BEAM_SHIFT_LIMIT_M:g} m limit",
                    detail={"field": axis, "limit_m": BEAM_SHIFT_LIMIT_M},
                )
        self._beam_shift = shift
        return shift

    # --- destructive steps ------------------------------------------------------------------------

    async def deposit_pt(self, request: DepositRequest, *, deadline_s: float | None = None) -> DepositResult:
        async with self._operation("deposit_pt"):
            self._require_vacuum("deposit_pt")
            heater_failed = self.faults.active("gis_heater_failure", time.monotonic())
            reached = AMBIENT_K if heater_failed else request.gis_temperature_k
            self._gis = GisState(inserted=True, heater_on=True, temperature_k=reached, valve_open=False)
            if reached < GIS_MIN_OPERATING_K:
                try:
                    await self._spend(timing.GIS_INSERT_S + 15.0)
                finally:
                    self._gis = GisState(
                        inserted=False, heater_on=False, temperature_k=reached, valve_open=False
                    )
                raise InstrumentFault(
                    f"GIS heater failure: precursor at {reached:.0f} K, needs >= {GIS_MIN_OPERATING_K:.0f} K",
                    detail={"verb": "deposit_pt", "gis_temperature_k": reached},
                )
            warmup = max(request.gis_temperature_k - AMBIENT_K, 0.0)
            duration = timing.deposit_time_s(request.thickness_m, request.beam, warmup, gis_inserted=False)
            self._patterning = "running"
            self._gis = GisState(inserted=True, heater_on=True, temperature_k=reached, valve_open=True)
            try:
                done, cut = await self._spend_or_cut(duration)
            finally:
                # Retract and close; the heater stays as it is now (a safe_state meanwhile switched it off).
                self._gis = GisState(
                    inserted=False,
                    heater_on=self._gis.heater_on,
                    temperature_k=self._gis.temperature_k,
                    valve_open=False,
                )
            thickness = request.thickness_m * done
            self._face.cap_m += thickness  # booked first: the infiltration below takes a while
            # Warmer precursor flows further into the pores (choice: linear in the temperature above 300 K).
            temp_factor = min(1.0 + (reached - 303.0) / 30.0, 1.5)
            nominal_m = min(thickness * INFILTRATION_PER_THICKNESS * temp_factor, MAX_INFILTRATION_M)
            # Dense bands along the run stop the precursor sooner; the instrument reports only the nominal
            # reach (a real one cannot see into the pores), the truth is on /test/truth.
            depth_m = nominal_m * infiltration_factor(self._face.position_m, self.settings.seed)
            depth_vox = math.ceil(depth_m / self.voxel_m)
            fi = self.face_index
            if depth_vox > 0 and fi < self.pt.shape[0]:
                mask = await self._in_thread(
                    asyncio.to_thread(
                        infiltrate, self.specimen.materials, fi, depth_vox, THROAT_RADIUS_M / self.voxel_m
                    )
                )
                mask = ragged_front(mask, self.settings.seed, fi)
                self.pt[fi : fi + mask.shape[0]] |= mask
            if cut is not None:
                raise cut
            if done < 1.0:
                raise AbortedError(
                    "deposit_pt stopped", detail={"verb": "deposit_pt", "thickness_m": thickness}
                )
            return DepositResult(
                duration_s=duration,
                thickness_m=thickness,
                infiltration_depth_m=nominal_m,
                cap_thickness_m=self._face.cap_m,
            )

    def _mill_checks(self, verb: str, species: str) -> None:
        self._require_vacuum(verb)
        if species != self._column.species:
            raise InvalidRequest(
                f"{verb}: ion column runs {self._column.species}, request asks {species}; "
                "switch with set_ion_beam",
                detail={"field": "species"},
            )

    def _refresh_curtain(self, current_a: float) -> None:
        fi = self.face_index
        self._face.curtain = curtain_map(
            self.specimen.materials[fi],
            self._face.cap_m,
            current_a,
            self._column.species,
            self._face.polish_passes,
            self._rng_curtain,
            self._face.curtain,
            pt=self.pt[fi],  # filled voids no longer seed curtains: the kintsugi side benefit
        )

    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> MillResult:
        async with self._operation("mill"):
            self._mill_checks("mill", request.species)
            end_m = (self.specimen.materials.shape[0] - 1) * self.voxel_m
            if self._face.position_m + request.slice_thickness_m > end_m:
                raise InstrumentFault(
                    f"mill: the simulated specimen ends at {end_m * 1e6:.2f} um of milling; "
                    "start kintsugi-sim with more --slices",
                    detail={"verb": "mill", "face_position_m": self._face.position_m},
                )
            current = request.current_a * self._current_factor()
            scatter = 0.06 + 0.04 * math.sqrt(request.current_a / 15e-9)
            removed = request.slice_thickness_m * float(
                np.clip(1.0 + self._rng_mill.normal(0.0, scatter), 0.5, 1.5)
            )
            volume = request.area.width_m * request.area.height_m * removed
            duration = timing.mill_time_s(volume, current, request.species, request.application)
            self._column.current_a = request.current_a
            self._patterning = "running"
            done, cut = await self._spend_or_cut(duration)
            # The same bookkeeping for a finished, stopped or cancelled mill: the face stays consistent.
            self._face.position_m += removed * done
            self._face.polish_passes = 0
            self._face.cap_m = max(self._face.cap_m - CAP_EROSION_PER_MILL_M, 0.0)
            self._drift.jump()
            self._refresh_curtain(request.current_a)
            if cut is not None:
                raise cut
            if done < 1.0:
                raise AbortedError(
                    "mill stopped; the face advanced by the part already milled",
                    detail={
                        "verb": "mill",
                        "removed_m": removed * done,
                        "face_position_m": self._face.position_m,
                    },
                )
            self._face.slice_index += 1
            return MillResult(
                duration_s=duration, removed_m=removed, face_position_m=self._face.position_m, completed=True
            )

    async def polish(self, request: PolishRequest, *, deadline_s: float | None = None) -> MillResult:
        async with self._operation("polish"):
            self._mill_checks("polish", request.species)
            removed = POLISH_REMOVAL_M * request.passes
            volume = request.area.width_m * request.area.height_m * removed
            duration = timing.mill_time_s(
                volume, request.current_a * self._current_factor(), request.species, "si"
            )
            self._patterning = "running"
            done, cut = await self._spend_or_cut(duration + 2.0 * request.passes)
            self._face.position_m += removed * done
            self._face.polish_passes += request.passes if done >= 1.0 else 0
            self._refresh_curtain(request.current_a)
            if cut is not None:
                raise cut
            if done < 1.0:
                raise AbortedError(
                    "polish stopped", detail={"verb": "polish", "face_position_m": self._face.position_m}
                )
            return MillResult(
                duration_s=duration, removed_m=removed, face_position_m=self._face.position_m, completed=True
            )

    async def mill_fiducial(
        self, request: FiducialRequest, *, deadline_s: float | None = None
    ) -> FiducialResult:
        async with self._operation("mill_fiducial"):
            self._mill_checks("mill_fiducial", request.species)
            volume = request.size_m**2 * request.depth_m * 0.4  # an X in a frame: ~40% of the square
            duration = timing.mill_time_s(
                volume, request.current_a * self._current_factor(), request.species, "pt"
            )
            if await self._spend(duration) < 1.0:
                raise AbortedError("mill_fiducial stopped", detail={"verb": "mill_fiducial"})
            x0, y0 = self._origin_m(0.0)  # the centre line across, the top of the field down
            self.fiducial = Fiducial(x0 + request.offset_x_m, y0 + request.offset_y_m, request.size_m)
            self._drift.jump()  # patterning disturbs the specimen like a mill does
            return FiducialResult(
                duration_s=duration,
                offset_x_m=request.offset_x_m,
                offset_y_m=request.offset_y_m,
                size_m=request.size_m,
            )

    async def stop(self, *, deadline_s: float | None = None) -> StopResult:
        """Stop the running operation: it books the part done and raises Aborted.

        An active comms drop makes this fail (CommsLost) like any call; a hang never applies to it.
        At time scale 0 operations finish instantly, so there is never anything running to interrupt.
        """
        self._fault_gate("stop", tick=False)
        running = self._busy
        self._stop.set()
        self._patterning = "idle"
        return StopResult(stopped=running)

    async def safe_state(self, *, deadline_s: float | None = None) -> SafeStateResult:
        """Stop patterning, blank both beams, retract the GIS and switch its heater off. Never hangs."""
        self._fault_gate("safe_state")
        self._stop.set()
        self._patterning = "idle"
        self._optics.beam_on = False
        self._column.beam_on = False
        self._gis = GisState(
            inserted=False, heater_on=False, temperature_k=self._gis.temperature_k, valve_open=False
        )
        return SafeStateResult(patterning_stopped=True, beams_blanked=True, gis_retracted=True)

    # --- imaging ----------------------------------------------------------------------------------

    def _conditions(self, request: AcquireRequest) -> ImagingConditions:
        detectors = []
        for d in request.detectors:
            if d.brightness is not None:
                self._optics.brightness[d.name] = d.brightness
            if d.contrast is not None:
                self._optics.contrast[d.name] = d.contrast
            detectors.append(
                DetectorSetting(
                    name=d.name,
                    brightness=self._optics.brightness.get(d.name, 0.5),
                    contrast=self._optics.contrast.get(d.name, 0.5),
                )
            )
        return ImagingConditions(
            detectors=tuple(detectors),
            width_px=request.width_px,
            height_px=request.height_px,
            pixel_size_m=request.pixel_size_m,
            dwell_s=request.dwell_s,
            line_integration=request.line_integration,
            voltage_v=request.voltage_v,
            current_a=request.current_a * self._current_factor(),
            origin_m=self._origin_m(request.width_px * request.pixel_size_m),
            defocus_m=self._optics.wd_set_m - self._required_wd_m(),
            astigmatism=self._optics.astigmatism,
            curtain=self._face.curtain,
        )

    async def acquire(self, request: AcquireRequest, *, deadline_s: float | None = None) -> Acquisition:
        async with self._operation("acquire"):
            self._require_vacuum("acquire")
            self._optics.beam_on = True  # a grab unblanks the beam, as on the instrument
            self._optics.current_a, self._optics.voltage_v = request.current_a, request.voltage_v
            cond = self._conditions(request)
            frame_s = timing.frame_time_s(
                request.width_px, request.height_px, request.dwell_s, request.line_integration
            )
            rendering = asyncio.ensure_future(
                asyncio.to_thread(render, self._face_view(), cond, self._rng_image)
            )
            try:
                done = await self._spend(frame_s)
            finally:
                rendered = await _finish(rendering)
            if done < 1.0:
                raise AbortedError("acquire stopped mid-frame", detail={"verb": "acquire"})
            if self.fiducial is not None:
                y_scale = 1.0 / SIN_SEM_FIB if self.geometry == "cross_section" else 1.0
                paint_fiducial(
                    rendered.images,
                    rendered.labels,
                    self.fiducial,
                    cond.origin_m,
                    request.pixel_size_m,
                    y_scale,
                    self._rng_image,
                )
            self._record_truth(cond, rendered.labels)
            self.last_labels = rendered.labels
            self._last_conditions = cond
            self._optics.astigmatism += float(self._rng_jump.normal(0.0, ASTIGMATISM_WALK_M))
            meta = AcquisitionMetadata(
                detectors=[d.name for d in request.detectors],
                width_px=request.width_px,
                height_px=request.height_px,
                pixel_size_m=request.pixel_size_m,
                dwell_s=request.dwell_s,
                line_integration=request.line_integration,
                voltage_v=request.voltage_v,
                current_a=cond.current_a,
                working_distance_m=self._optics.wd_set_m,
                brightness={d.name: d.brightness for d in cond.detectors},
                contrast={d.name: d.contrast for d in cond.detectors},
                beam_shift=self._beam_shift,
                face_position_m=self._face.position_m,
                slice_index=self._face.slice_index,
                frame_time_s=frame_s,
                timestamp=time.time(),
            )
            return Acquisition(rendered.images, meta)

    async def auto_function(
        self, request: AutoFunctionRequest, *, deadline_s: float | None = None
    ) -> AutoFunctionResult:
        async with self._operation("auto_function"):
            self._require_vacuum("auto_function")
            if await self._spend(timing.AUTO_FUNCTION_S[request.function]) < 1.0:
                raise AbortedError(  # the optics keep their old settings
                    f"auto_function {request.function} stopped", detail={"verb": "auto_function"}
                )
            result = AutoFunctionResult(
                function=request.function,
                duration_s=timing.AUTO_FUNCTION_S[request.function],
                working_distance_m=self._optics.wd_set_m,
            )
            if request.function == "focus":
                self._optics.wd_set_m = self._required_wd_m()
                return result.model_copy(update={"working_distance_m": self._optics.wd_set_m})
            if request.function == "stigmation":
                self._optics.astigmatism = 0.0
                return result
            detector = request.detector
            if detector is None:
                raise InvalidRequest("contrast_brightness needs a detector", detail={"field": "detector"})
            cond = self._last_conditions
            if cond is None:
                raise InvalidRequest(
                    "contrast_brightness needs an image first: acquire once", detail={"field": "detector"}
                )
            cond = ImagingConditions(
                **{
                    **cond.__dict__,
                    "origin_m": self._origin_m(cond.width_px * cond.pixel_size_m),
                    "curtain": self._face.curtain,
                }
            )
            b, c = await self._in_thread(
                asyncio.to_thread(auto_contrast_brightness, self._face_view(), cond, detector)
            )
            self._optics.brightness[detector], self._optics.contrast[detector] = b, c
            return result.model_copy(update={"brightness": b, "contrast": c})

    async def edx_map(self, request: EdxRequest, *, deadline_s: float | None = None) -> EdxResult:
        async with self._operation("edx_map"):
            self._require_vacuum("edx_map")
            duration = timing.edx_time_s(request.width_m, request.height_m, request.step_m, request.dwell_s)
            done = await self._spend(duration)
            if done < 1.0:
                raise AbortedError("edx_map stopped", detail={"verb": "edx_map"})
            maps = await self._in_thread(
                asyncio.to_thread(
                    render_edx,
                    self._face_view(),
                    request.elements,
                    request.step_m,
                    request.width_m,
                    request.height_m,
                    self._origin_m(request.width_m),
                    request.voltage_v,
                    request.current_a * self._current_factor(),
                    request.dwell_s,
                    self._rng_image,
                )
            )
            return EdxResult(maps, request.step_m, duration)

    # --- test-only views --------------------------------------------------------------------------

    def inject_drift(self, dx_m: float, dy_m: float) -> None:
        self._drift.inject(dx_m, dy_m)

    def _record_truth(self, cond: ImagingConditions, labels: np.ndarray) -> None:
        ex, ey = self._fov_error_m()
        self.truth.append(
            {
                "slice_index": float(self._face.slice_index),
                "face_position_m": self._face.position_m,
                "fov_error_x_m": ex,
                "fov_error_y_m": ey,
                "drift_x_m": float(self._drift.position_m[0]),
                "drift_y_m": float(self._drift.position_m[1]),
                "defocus_m": cond.defocus_m,
                "astigmatism": cond.astigmatism,
                "pore_px": float(np.count_nonzero(labels == CANONICAL_CLASSES["pore"])),
                "unfilled_pore_px": float(np.count_nonzero(labels == CANONICAL_CLASSES["unfilled_pore"])),
                "instrument_time_s": self._instrument_s,
            }
        )

    def face_report(self) -> dict[str, object]:
        fi = self.face_index
        return {
            "face_index": fi,
            "face_position_m": self._face.position_m,
            "slice_index": self._face.slice_index,
            "pt_voxels_ahead": int(self.pt[fi : fi + DEPTH_AHEAD_VOX].sum()),
            "drift_m": [float(v) for v in self._drift.position_m],
            "fov_error_m": list(self._fov_error_m()),
            "defocus_m": self._optics.wd_set_m - self._required_wd_m(),
            "fiducial": None if self.fiducial is None else self.fiducial.__dict__,
            "cap_thickness_m": self._face.cap_m,
            "instrument_time_s": self._instrument_s,
            "faults": self.faults.describe(time.monotonic()),
        }


def _first_field(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            return ".".join(str(p) for p in errs[0]["loc"])
    return "body"
