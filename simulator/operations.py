"""The simulated instrument's core: state, serialised and stoppable operations, faults, instrument time.

Instrument state (face position, Pt in the pores ahead of the face, cap, curtaining, drift, focus,
GIS, vacuum, beams, stage) lives in `InstrumentCore`; the verbs live in `simulator.instrument` (motion,
Pt, milling) and `simulator.imaging_verbs` (acquire, auto functions, EDX). Operations are serialised
like the real instrument's, charge instrument time from the timing model, and can be stopped midway.

Pacing: an operation takes its simulated duration x time scale of wall time, and the simulator's own
computation for it (rendering, infiltration, the curtain of the new face) runs in a worker thread inside
that window, so the simulator's wall time equals instrument time and every gap between operations is
the client's. Work that does not fit the window (large frames at a small time scale, or time scale 0) is
booked as `overrun_s` of the operation in the busy log (`busy_log`, served on `/test/busy`), never
silently stretched into instrument time.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from kintsugi_daemon.drivers.base import Aborted as AbortedError
from kintsugi_daemon.drivers.base import (
    BeamShift,
    CommsLost,
    GisState,
    InstrumentBusy,
    InstrumentFault,
    InstrumentIdentity,
    InstrumentState,
    InvalidRequest,
    IonBeamState,
    SafeStateResult,
    StagePosition,
    StopResult,
)
from kintsugi_daemon.instrument import (
    AMBIENT_K,
    BEAM_SHIFT_LIMIT_M,
    SEM_FIB_ANGLE_DEG,
)
from simulator.drift import Drift
from simulator.faults import FaultPlan, FaultSpec
from simulator.fiducial import Fiducial
from simulator.imaging import (
    CAP_VIEW_M,
    FaceView,
    ImagingConditions,
)
from simulator.materials import CANONICAL_CLASSES
from simulator.pore_back import PORE_BACK_MAX_DEPTH_M
from simulator.specimen import Specimen

__all__ = [
    "BUSY_LOG_LENGTH",
    "DEPTH_AHEAD_VOX",
    "OPERATION_VERBS",
    "BusyInterval",
    "InstrumentCore",
    "SimulatorSettings",
    "check_fault_applicable",
    "depth_ahead_vox",
]

T = TypeVar("T")

BUSY_LOG_LENGTH = 20_000  # operations kept for /test/busy (a 400-slice night is ~3,000)


@dataclass(frozen=True)
class BusyInterval:
    """One operation on the simulator's wall clock (time.monotonic, system-wide on Linux)."""

    verb: str
    start_s: float
    end_s: float
    instrument_s: float  # simulated seconds it charged
    overrun_s: float  # wall time beyond instrument_s x time scale: simulator computation that did not fit


def depth_ahead_vox(voxel_m: float) -> int:
    """Planes behind the face the renderer may see through pores: the pore-back reach plus two."""
    return math.ceil(PORE_BACK_MAX_DEPTH_M / voxel_m) + 2


DEPTH_AHEAD_VOX = depth_ahead_vox(40e-9)  # at the default 40 nm voxels (127)
CURRENT_DROP_FACTOR = 0.6


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
    # Pt passes only throats at least twice this wide: 40 nm lets it into nearly every open void
    throat_radius_m: float = 40e-9
    # Share of the face area where the precursor gets in at all: below 1, patches ~2-5 um across (a
    # smooth random field over the face, fixed for the run) stay empty - uneven precursor supply or pore
    # mouths sealed by the deposit, i.e. a partial infiltration
    infiltration_coverage: float = 1.0
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


class InstrumentCore:
    """State and operation machinery shared by every verb. Not thread-safe; one event loop owns it."""

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
        self.busy_log: deque[BusyInterval] = deque(maxlen=BUSY_LOG_LENGTH)
        self.last_labels: np.ndarray | None = None
        self._last_conditions: ImagingConditions | None = None

    # --- bookkeeping ------------------------------------------------------------------------------

    @property
    def face_index(self) -> int:
        last = int(self.specimen.materials.shape[0]) - 1
        return min(round(self._face.position_m / self.voxel_m), last)

    def _face_view(self) -> FaceView:
        fi = self.face_index
        ahead = depth_ahead_vox(self.voxel_m)
        return FaceView(
            materials=self.specimen.materials[fi : fi + ahead],
            pt=self.pt[fi : fi + ahead],
            voxel_size_m=self.voxel_m,
            geometry=self.geometry,
            pt_source="electron",
            z_m=fi * self.voxel_m,
            cap_m=self._face.cap_m,
            texture_seed=self.specimen.params.seed,
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
        t0, charged0 = time.monotonic(), self._instrument_s
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
            end, charged = time.monotonic(), self._instrument_s - charged0
            paced = charged * self.settings.time_scale
            self.busy_log.append(BusyInterval(verb, t0, end, charged, max(0.0, end - t0 - paced)))

    async def _spend(self, simulated_s: float) -> float:
        """Charge instrument time; return the fraction done (1.0, or less when stopped).

        Cancelled (a server deadline), it raises `_Cancelled` carrying the fraction done, so the verb
        books it on the same path as a stop. At time scale 0 the time passes instantly: nothing can stop it.
        """
        if not math.isfinite(simulated_s) or simulated_s < 0:
            # Never booked: one infinite operation would leave instrument_time_s (and every state) invalid.
            raise InstrumentFault(f"operation would take {simulated_s} s of instrument time")
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

    def _compute_during(self, fn: Callable[..., T], *args: object, **kwargs: object) -> asyncio.Future[T]:
        """Start an operation's computation in a worker thread, inside its instrument-time window; the verb
        awaits it with `_in_thread` after `_spend`, so only what overruns the window adds wall time."""
        return asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))

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
            y -= CAP_VIEW_M  # the frame's top rows show the protective cap, as on the instrument
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
        return self._state_now()

    def _state_after(self) -> InstrumentState:
        """The state an operation's answer carries: as it ends, no longer busy or patterning."""
        return self._state_now().model_copy(update={"busy": None, "patterning": "idle"})

    def _state_now(self) -> InstrumentState:
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
            "pt_voxels_ahead": int(self.pt[fi : fi + depth_ahead_vox(self.voxel_m)].sum()),
            "drift_m": [float(v) for v in self._drift.position_m],
            "fov_error_m": list(self._fov_error_m()),
            "defocus_m": self._optics.wd_set_m - self._required_wd_m(),
            "fiducial": None if self.fiducial is None else self.fiducial.__dict__,
            "cap_thickness_m": self._face.cap_m,
            "instrument_time_s": self._instrument_s,
            "faults": self.faults.describe(time.monotonic()),
        }
