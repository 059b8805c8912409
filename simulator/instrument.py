"""A simulated Helios Hydra implementing the DualBeam protocol over a voxel specimen.

`SimulatedDualBeam` adds motion, beams, Pt deposition, milling and polishing to the imaging verbs and the
core state of `simulator.operations`. The physics of each step lives in its own module (infiltration,
curtaining). A stopped mill advances the face only by the fraction it milled, so the face stays consistent.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
from scipy import ndimage as ndi

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.drivers.base import Aborted as AbortedError
from kintsugi_daemon.drivers.base import (
    BeamShift,
    DepositRequest,
    DepositResult,
    FiducialRequest,
    FiducialResult,
    GisState,
    InstrumentFault,
    InvalidRequest,
    IonBeamSettings,
    IonBeamState,
    MillRequest,
    MillResult,
    PolishRequest,
    StageMove,
    StagePosition,
)
from kintsugi_daemon.instrument import (
    AMBIENT_K,
    BEAM_SHIFT_LIMIT_M,
    GIS_MIN_OPERATING_K,
    POLISH_REMOVAL_M,
)
from simulator.fiducial import Fiducial
from simulator.imaging import (
    curtain_map,
)
from simulator.imaging_verbs import ImagingVerbs
from simulator.infiltration import infiltrate, infiltration_factor, ragged_front
from simulator.operations import (
    DEPTH_AHEAD_VOX,
    InstrumentCore,
    SimulatorSettings,
    check_fault_applicable,
)

__all__ = [
    "DEPTH_AHEAD_VOX",
    "InstrumentCore",
    "SimulatedDualBeam",
    "SimulatorSettings",
    "check_fault_applicable",
]

CAP_EROSION_PER_MILL_M = 2e-9
INFILTRATION_PER_THICKNESS = 5.0  # infiltration depth per deposited thickness (choice; DOMAIN sweep 0.2-5 um)
MAX_INFILTRATION_M = 5e-6


class SimulatedDualBeam(ImagingVerbs):
    """The DualBeam protocol over a simulated specimen. Not thread-safe; one event loop owns it."""

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
            if request.gis_temperature_k < GIS_MIN_OPERATING_K:
                # Asked for, not failed: the request is wrong, the instrument is fine (422, not 503).
                raise InvalidRequest(
                    f"deposit_pt: the Pt precursor needs >= {GIS_MIN_OPERATING_K:.0f} K, "
                    f"asked for {request.gis_temperature_k:.1f} K",
                    detail={"field": "gis_temperature_k"},
                )
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
            # Warmer precursor flows further into the pores (choice: linear in the temperature above 300 K).
            temp_factor = min(1.0 + (reached - 303.0) / 30.0, 1.5)
            fi = self.face_index
            # The infiltration of a full deposit is computed while the deposit's instrument time passes.
            planned = self._infiltration(request.thickness_m, temp_factor, fi)
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
                mask = await self._in_thread(planned[1]) if planned[1] is not None else None
            thickness = request.thickness_m * done
            self._face.cap_m += thickness
            depth_m = planned[0]
            if done < 1.0:  # stopped: only the part deposited infiltrates (rare, so computed again)
                depth_m, partial = self._infiltration(thickness, temp_factor, fi)
                mask = await self._in_thread(partial) if partial is not None else None
            if mask is not None:
                self.pt[fi : fi + mask.shape[0]] |= mask & self._coverage()[None]
            if cut is not None:
                raise cut
            if done < 1.0:
                raise AbortedError(
                    "deposit_pt stopped", detail={"verb": "deposit_pt", "thickness_m": thickness}
                )
            return DepositResult(
                duration_s=duration,
                thickness_m=thickness,
                infiltration_depth_m=depth_m,
                cap_thickness_m=self._face.cap_m,
                state=self._state_after(),
            )

    def _coverage(self) -> np.ndarray:
        """Where on the face the precursor gets in (all True at full coverage); fixed for the run."""
        rows, cols = self.specimen.materials.shape[1:]
        coverage = self.settings.infiltration_coverage
        if coverage >= 1.0:
            return np.ones((rows, cols), bool)
        rng = np.random.default_rng([self.settings.seed, 0x70617274])
        cell = max(1, round(0.5e-6 / self.voxel_m))
        coarse = ndi.gaussian_filter(rng.standard_normal((rows // cell + 2, cols // cell + 2)), 3.0)
        # bilinear up-sampling: smooth patch borders (nearest repetition would draw square pixels)
        field = ndi.zoom(coarse, (rows / coarse.shape[0], cols / coarse.shape[1]), order=1)[:rows, :cols]
        out: np.ndarray = field >= np.quantile(field, 1.0 - coverage)
        return out

    def _mill_checks(self, verb: str, species: str) -> None:
        self._require_vacuum(verb)
        if species != self._column.species:
            raise InvalidRequest(
                f"{verb}: ion column runs {self._column.species}, request asks {species}; "
                "switch with set_ion_beam",
                detail={"field": "species"},
            )

    def _infiltration(
        self, thickness_m: float, temp_factor: float, fi: int
    ) -> tuple[float, asyncio.Future[np.ndarray] | None]:
        """Nominal infiltration depth of a deposit and its Pt mask ahead of face `fi`, computing in a thread.

        Dense bands along the run stop the precursor sooner (`infiltration_factor`) and the front is ragged
        across the face; the instrument reports only the nominal reach (a real one cannot see into the
        pores), the truth is on /test/truth."""
        nominal_m = min(thickness_m * INFILTRATION_PER_THICKNESS * temp_factor, MAX_INFILTRATION_M)
        depth_m = nominal_m * infiltration_factor(self._face.position_m, self.settings.seed)
        depth_vox = math.ceil(depth_m / self.voxel_m)
        if depth_vox <= 0 or fi >= self.pt.shape[0]:
            return nominal_m, None
        radius_vox = self.settings.throat_radius_m / self.voxel_m
        return nominal_m, self._compute_during(
            _ragged_infiltration, self.specimen.materials, fi, depth_vox, radius_vox, self.settings.seed
        )

    def _curtain(self, fi: int, cap_m: float, current_a: float, passes: int) -> asyncio.Future[np.ndarray]:
        """The curtain map of face `fi` as it will be after the cut, computing in a thread."""
        return self._compute_during(
            curtain_map,
            self.specimen.materials[fi],
            cap_m,
            current_a,
            self._column.species,
            passes,
            self._rng_curtain,
            self._face.curtain,
            pt=self.pt[fi],  # filled voids no longer seed curtains: the kintsugi side benefit
            voxel_size_m=self.voxel_m,
        )

    def _index_at(self, position_m: float) -> int:
        return min(round(position_m / self.voxel_m), int(self.specimen.materials.shape[0]) - 1)

    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> MillResult:
        async with self._operation("mill"):
            self._mill_checks("mill", request.species)
            end_m = (self.specimen.materials.shape[0] - 1) * self.voxel_m
            if self._face.position_m + request.slice_thickness_m > end_m:
                # A request beyond what the specimen holds, like a beam shift beyond its limit: 422.
                raise InvalidRequest(
                    f"mill: the simulated specimen ends at {end_m * 1e6:.2f} um of milling; "
                    "start kintsugi-sim with more --slices",
                    detail={"field": "slice_thickness_m", "face_position_m": self._face.position_m},
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
            cap_after = max(self._face.cap_m - CAP_EROSION_PER_MILL_M, 0.0)
            curtain = self._curtain(
                self._index_at(self._face.position_m + removed), cap_after, request.current_a, 0
            )
            try:
                done, cut = await self._spend_or_cut(duration)
            finally:
                planned = await self._in_thread(curtain)
            # The same bookkeeping for a finished, stopped or cancelled mill: the face stays consistent.
            self._face.position_m += removed * done
            self._face.polish_passes = 0
            self._face.cap_m = cap_after
            self._drift.jump()
            self._face.curtain = (
                planned
                if done >= 1.0
                else await self._in_thread(self._curtain(self.face_index, cap_after, request.current_a, 0))
            )
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
                duration_s=duration,
                removed_m=removed,
                face_position_m=self._face.position_m,
                completed=True,
                state=self._state_after(),
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
            after = self._index_at(self._face.position_m + removed)
            passes = self._face.polish_passes + request.passes
            curtain = self._curtain(after, self._face.cap_m, request.current_a, passes)
            try:
                done, cut = await self._spend_or_cut(duration + 2.0 * request.passes)
            finally:
                planned = await self._in_thread(curtain)
            self._face.position_m += removed * done
            self._face.polish_passes += request.passes if done >= 1.0 else 0
            self._face.curtain = (
                planned
                if done >= 1.0
                else await self._in_thread(
                    self._curtain(
                        self.face_index, self._face.cap_m, request.current_a, self._face.polish_passes
                    )
                )
            )
            if cut is not None:
                raise cut
            if done < 1.0:
                raise AbortedError(
                    "polish stopped", detail={"verb": "polish", "face_position_m": self._face.position_m}
                )
            return MillResult(
                duration_s=duration,
                removed_m=removed,
                face_position_m=self._face.position_m,
                completed=True,
                state=self._state_after(),
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
                state=self._state_after(),
            )


def _ragged_infiltration(
    materials: np.ndarray, fi: int, depth_vox: int, radius_vox: float, seed: int
) -> np.ndarray:
    """The Pt mask of one deposit with its front ragged across the face (a worker thread's job)."""
    return ragged_front(infiltrate(materials, fi, depth_vox, radius_vox), seed, fi)


def _first_field(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            return ".".join(str(p) for p in errs[0]["loc"])
    return "body"
