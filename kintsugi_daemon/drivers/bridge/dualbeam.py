"""`BridgeDualBeam`: the DualBeam protocol over an OpenFIBSEM microscope (Thermo, Tescan or the Demo).

OpenFIBSEM's verbs serve every backend; with `AutoScriptVerbs` (the thermo backend) imaging, patterning,
deposition, the ion column, the beam shift and the safe state go to AutoScript directly (see autoscript.py
for why). Without them (tescan, demo) a multi-detector grab is answered one detector at a time, and
patterning runs through OpenFIBSEM's `run_milling`, stopped with `stop_milling`.

One destructive or slow verb at a time (another gets InstrumentBusy); OpenFIBSEM and AutoScript block, so
each runs in a worker thread. A verb whose caller gave up (deadline) keeps the instrument busy until its
thread has returned: `stop` is what ends it. The face position and Pt cap the daemon reconciles with
come from the patterns this bridge completed, kept in a state file so a bridge restart does not forget them.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    AcquisitionMetadata,
    AutoFunctionRequest,
    AutoFunctionResult,
    BeamShift,
    DepositRequest,
    DepositResult,
    EdxRequest,
    EdxResult,
    FiducialRequest,
    FiducialResult,
    GisState,
    InstrumentBusy,
    InstrumentError,
    InstrumentFault,
    InstrumentIdentity,
    InstrumentState,
    InvalidRequest,
    IonBeamSettings,
    IonBeamState,
    MillRequest,
    MillResult,
    PolishRequest,
    Rectangle,
    SafeStateResult,
    StageMove,
    StagePosition,
    StopResult,
    Unsupported,
)
from kintsugi_daemon.drivers.bridge.autoscript import (
    DETECTOR_TYPES,
    PLASMA_GASES,
    AutoScriptVerbs,
    DetectorSetup,
    PatternJob,
)
from kintsugi_daemon.drivers.bridge.openfibsem import fibsem_position, grab_one_by_one, run_pattern
from kintsugi_daemon.service.atomic import write_json_atomic

__all__ = ["APPLICATION_FILES", "Bookkeeping", "BridgeDualBeam"]

T = TypeVar("T")

# Recipe application keys -> instrument application files (sites rename them: `--application-file`).
APPLICATION_FILES: dict[str, str] = {
    "si": "Si",
    "c": "C",
    "al": "Al",
    "pt": "Pt",
    "cleaning_cross_section": "Si-ccs",
    "deposit": "Pt dep",
}
POLISH_REMOVAL_M = 5e-9  # per pass; the same nominal figure the daemon reconciles a polish with
AMBIENT_K = 295.0
GIS_WARMUP_S = 15.0  # DOMAIN.md: heater warm-up to ~300 K, up to 15 s
STOP_REPEAT_S = 8.0  # within the client's 10 s stop deadline
STOP_POLL_S = 0.1
DESTRUCTIVE = frozenset({"deposit_pt", "mill", "polish"})
DEFAULT_SHIFT_LIMIT_M = 10e-6  # beam-shift limits are read on Thermo only; 10 um is a typical SEM figure


@dataclass
class Bookkeeping:
    """What the bridge knows from the patterns it completed (the instrument has no face-position sensor)."""

    face_position_m: float = 0.0
    pt_cap_thickness_m: float = 0.0
    instrument_time_s: float = 0.0
    slices: int = 0

    @classmethod
    def load(cls, path: Path | None) -> Bookkeeping:
        if path is None or not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in asdict(cls())})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bridge state file ({exc})") from None

    def save(self, path: Path | None) -> None:
        if path is not None:
            write_json_atomic(path, asdict(self))


class BridgeDualBeam:
    """A DualBeam over an OpenFIBSEM `FibsemMicroscope`, with AutoScript where `direct` is set."""

    def __init__(
        self,
        microscope: Any,
        *,
        backend: Literal["thermo", "tescan", "demo"],
        direct: AutoScriptVerbs | None = None,
        application_files: dict[str, str] | None = None,
        state_file: Path | None = None,
        gis_warmup_s: float = GIS_WARMUP_S,
    ) -> None:
        from fibsem.structures import BeamType  # the [bridge] extra; imported only when a bridge runs

        self.m = microscope
        self.backend = backend
        self.direct = direct
        self.apps = {**APPLICATION_FILES, **(application_files or {})}
        self.state_file = state_file
        self.book = Bookkeeping.load(state_file)
        self.gis_warmup_s = gis_warmup_s
        self._e, self._i = BeamType.ELECTRON, BeamType.ION
        self._busy: str | None = None
        self._busy_lock = threading.Lock()
        self._stop = threading.Event()
        self._gis = GisState(inserted=False, heater_on=False, temperature_k=AMBIENT_K, valve_open=False)
        self._ion_setpoint_a = float(self.m.get_beam_current(self._i))
        self._switch_time_s = 0.0

    def check_application_files(self) -> None:
        """At start: every application file a recipe can ask for exists (not a fault at slice 1 at 2 am)."""
        needed = sorted(set(self.apps.values()))
        if self.direct is not None:
            self.direct.check_application_files(needed)
            return
        available = set(self.m.get_available_values("application_file"))
        missing = [name for name in needed if name not in available]
        if missing:
            raise ValueError(
                f"application files {missing} are not on this instrument (it has {sorted(available)}); "
                "map them with --application-file KEY=NAME"
            )

    # --- running blocking calls ---------------------------------------------------------------------

    async def _run(self, verb: str, call: Callable[[], T], *, exclusive: bool = True) -> T:
        """Run `call` in a thread; exclusive verbs hold the instrument until the thread returns."""
        if exclusive:
            with self._busy_lock:
                if self._busy is not None:
                    raise InstrumentBusy(f"{self._busy} is in progress", detail={"busy": self._busy})
                self._busy = verb
                self._stop.clear()
                if self.direct is not None:
                    self.direct.reset_stop()

        def work() -> T:
            t0 = time.monotonic()
            try:
                return call()
            except InstrumentError:
                raise
            except ValueError as exc:  # OpenFIBSEM's word for "not available on this instrument"
                raise InvalidRequest(f"{verb}: {exc}", detail={"verb": verb}) from exc
            except Exception as exc:  # AutoScript/OpenFIBSEM errors: the step did not complete
                raise InstrumentFault(f"{verb}: {type(exc).__name__}: {exc}", detail={"verb": verb}) from exc
            finally:
                if exclusive:
                    self.book.instrument_time_s += time.monotonic() - t0
                    with self._busy_lock:
                        self._busy = None

        # Shielded: a caller that gives up (deadline) does not free the instrument; `stop` ends the work.
        return await asyncio.shield(asyncio.to_thread(work))

    # --- identity and state -------------------------------------------------------------------------

    async def identity(self, *, deadline_s: float | None = None) -> InstrumentIdentity:
        info = self.m.system.info
        return InstrumentIdentity(
            model=str(info.model),
            serial=str(info.serial_number),
            software=f"{info.software_version} via OpenFIBSEM ({self.backend} backend)",
            simulated=self.backend == "demo",
        )

    def _read_state(self) -> InstrumentState:
        m, e, i = self.m, self._e, self._i
        chamber = str(m.get("chamber_state")).lower()
        vacuum = chamber if chamber in ("pumped", "venting", "vented", "pumping") else "fault"
        species, ion_current, ion_voltage = self._ion()
        shift = m.get_beam_shift(e)
        pos = m.get_stage_position()
        milling = str(m.get_milling_state().name).lower()
        e_current = float(m.get_beam_current(e))
        return InstrumentState(
            vacuum=vacuum,  # type: ignore[arg-type]  # narrowed above
            chamber_pressure_pa=float(m.get("chamber_pressure") or 0.0),
            electron_beam_on=bool(m.is_on(e)) and not bool(m.is_blanked(e)),
            electron_current_a=e_current,
            electron_current_setpoint_a=e_current,
            ion_current_setpoint_a=self._ion_setpoint_a,
            electron_voltage_v=float(m.get_beam_voltage(e)),
            working_distance_m=float(m.get_working_distance(e)),
            ion_beam_on=bool(m.is_on(i)) and not bool(m.is_blanked(i)),
            ion=IonBeamState(
                species=species,
                current_a=ion_current,
                voltage_v=ion_voltage,
                switch_time_s=self._switch_time_s,
            ),
            gis=self._gis,
            beam_shift=BeamShift(x_m=float(shift.x), y_m=float(shift.y)),
            beam_shift_limit_m=self.direct.beam_shift_limit_m() if self.direct else DEFAULT_SHIFT_LIMIT_M,
            stage=StagePosition(
                x_m=float(pos.x),
                y_m=float(pos.y),
                z_m=float(pos.z),
                tilt_deg=math.degrees(float(pos.t)),
                rotation_deg=math.fmod(math.degrees(float(pos.r)), 360.0),
            ),
            patterning="running" if milling == "running" else "paused" if milling == "paused" else "idle",
            busy=self._busy,
            face_position_m=self.book.face_position_m,
            pt_cap_thickness_m=self.book.pt_cap_thickness_m,
            instrument_time_s=self.book.instrument_time_s,
        )

    def _ion(self) -> tuple[Any, float, float]:
        if self.direct is not None:
            species, current, voltage = self.direct.ion_state()
        else:
            gas = self.m.get("plasma_gas", self._i)
            species = next((k for k, v in PLASMA_GASES.items() if v == gas), None)
            current, voltage = (
                float(self.m.get_beam_current(self._i)),
                float(self.m.get_beam_voltage(self._i)),
            )
        if species is None:
            raise InstrumentFault("the ion column reports no plasma gas: the bridge drives plasma FIBs only")
        return species, current, voltage

    async def state(self, *, deadline_s: float | None = None) -> InstrumentState:
        return await self._run("state", self._read_state, exclusive=False)

    # --- stage and beams ----------------------------------------------------------------------------

    async def move_stage(self, move: StageMove, *, deadline_s: float | None = None) -> StagePosition:
        position = fibsem_position(move)

        def go() -> None:
            if move.mode == "absolute":
                self.m.move_stage_absolute(position)
            else:
                self.m.move_stage_relative(position)

        await self._run("move_stage", go)
        return (await self.state()).stage

    async def set_ion_beam(
        self, settings: IonBeamSettings, *, deadline_s: float | None = None
    ) -> IonBeamState:
        def switch() -> float:
            if self.direct is not None:
                return self.direct.set_ion_beam(settings.species, settings.voltage_v, settings.current_a)
            t0 = time.monotonic()
            gas = PLASMA_GASES[settings.species]
            if self.m.get("plasma_gas", self._i) != gas:
                if gas not in self.m.get_available_values("plasma_gas", self._i):
                    raise InvalidRequest(f"plasma gas {gas} is not available", detail={"field": "species"})
                self.m.set("plasma_gas", gas, self._i)
            self.m.set_beam_voltage(settings.voltage_v, self._i)
            self.m.set_beam_current(settings.current_a, self._i)
            return time.monotonic() - t0

        self._switch_time_s = await self._run("set_ion_beam", switch)
        self._ion_setpoint_a = settings.current_a
        return (await self.state()).ion

    async def set_beam_shift(self, shift: BeamShift, *, deadline_s: float | None = None) -> BeamShift:
        from fibsem.structures import Point

        def write() -> tuple[float, float]:
            if self.direct is not None:
                return self.direct.set_beam_shift(shift.x_m, shift.y_m)
            self.m.set_beam_shift(Point(shift.x_m, shift.y_m), self._e)
            now = self.m.get_beam_shift(self._e)
            return float(now.x), float(now.y)

        x, y = await self._run("set_beam_shift", write)
        return BeamShift(x_m=x, y_m=y)

    # --- destructive steps --------------------------------------------------------------------------

    def _run_job(self, job: PatternJob) -> None:
        beam = self._i if job.beam == "ion" else self._e
        current = job.current_a if job.current_a is not None else float(self.m.get_beam_current(beam))
        if job.beam == "ion":
            self._ion_setpoint_a = current  # the pattern runs at its own current: the guard's new band
        if self.direct is not None:
            self.direct.run_pattern(job)
        else:
            run_pattern(self.m, job, current, float(self.m.get_beam_voltage(beam)), self._stop)

    def _job(
        self,
        kind: Any,
        area: Rectangle,
        depth_m: float,
        app: str,
        beam: Any = "ion",
        current_a: float | None = None,
    ) -> PatternJob:
        return PatternJob(
            kind=kind,
            center_x_m=area.center_x_m,
            center_y_m=area.center_y_m,
            width_m=area.width_m,
            height_m=area.height_m,
            depth_m=depth_m,
            application_file=self.apps[app],
            beam=beam,
            current_a=current_a,
        )

    async def deposit_pt(self, request: DepositRequest, *, deadline_s: float | None = None) -> DepositResult:
        job = self._job("rectangle", request.area, request.thickness_m, "deposit", request.beam)

        def deposit() -> float:
            t0 = time.monotonic()
            self._gis = GisState(
                inserted=True, heater_on=True, temperature_k=request.gis_temperature_k, valve_open=False
            )
            try:
                if self.direct is not None:
                    self.direct.deposit_pt(job, self.gis_warmup_s)
                else:
                    self._run_job(job)
            finally:
                self._gis = GisState(
                    inserted=False, heater_on=False, temperature_k=AMBIENT_K, valve_open=False
                )
            self.book.pt_cap_thickness_m += request.thickness_m
            self.book.save(self.state_file)
            return time.monotonic() - t0

        duration = await self._run("deposit_pt", deposit)
        # Infiltration depth is not measurable on the instrument: 0 says "unknown", not "none".
        return DepositResult(
            duration_s=duration,
            thickness_m=request.thickness_m,
            infiltration_depth_m=0.0,
            cap_thickness_m=self.book.pt_cap_thickness_m,
        )

    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> MillResult:
        if request.pattern == "cleaning_cross_section":
            kind, app = "cleaning_cross_section", "cleaning_cross_section"
        else:  # a planar spin-mill pass is a rectangle at the stage's tilt
            kind, app = "rectangle", request.application
        job = self._job(kind, request.area, request.slice_thickness_m, app, current_a=request.current_a)
        return await self._remove("mill", job, request.slice_thickness_m, new_slice=True)

    async def polish(self, request: PolishRequest, *, deadline_s: float | None = None) -> MillResult:
        removed = POLISH_REMOVAL_M * request.passes
        job = self._job(
            "cleaning_cross_section",
            request.area,
            removed,
            "cleaning_cross_section",
            current_a=request.current_a,
        )
        return await self._remove("polish", job, removed, new_slice=False)

    async def mill_fiducial(
        self, request: FiducialRequest, *, deadline_s: float | None = None
    ) -> FiducialResult:
        """A square mark beside the region. The request places it from the top centre of the SEM field;
        the pattern is placed from the ion beam's field centre, which coincides at the eucentric height
        (an approximation to check on hardware: an X would match better than a plain square)."""
        area = Rectangle(
            center_x_m=request.offset_x_m,
            center_y_m=request.offset_y_m,
            width_m=request.size_m,
            height_m=request.size_m,
        )
        job = self._job("rectangle", area, request.depth_m, "si", current_a=request.current_a)

        def work() -> float:
            t0 = time.monotonic()
            self._run_job(job)
            return time.monotonic() - t0

        duration = await self._run("mill_fiducial", work)
        return FiducialResult(
            duration_s=duration,
            offset_x_m=request.offset_x_m,
            offset_y_m=request.offset_y_m,
            size_m=request.size_m,
        )

    async def _remove(self, verb: str, job: PatternJob, removed_m: float, *, new_slice: bool) -> MillResult:
        def work() -> float:
            t0 = time.monotonic()
            self._run_job(job)
            self.book.face_position_m += removed_m
            self.book.slices += int(new_slice)
            self.book.save(self.state_file)
            return time.monotonic() - t0

        duration = await self._run(verb, work)
        return MillResult(
            duration_s=duration,
            removed_m=removed_m,
            face_position_m=self.book.face_position_m,
            completed=True,
        )

    # --- imaging ------------------------------------------------------------------------------------

    async def acquire(self, request: AcquireRequest, *, deadline_s: float | None = None) -> Acquisition:
        names = [d.name for d in request.detectors]

        def grab() -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float], float]:
            t0 = time.monotonic()
            if self.direct is not None:
                setups = [DetectorSetup(d.name, d.mode, d.brightness, d.contrast) for d in request.detectors]
                images = self.direct.grab(
                    setups,
                    width_px=request.width_px,
                    height_px=request.height_px,
                    pixel_size_m=request.pixel_size_m,
                    dwell_s=request.dwell_s,
                    line_integration=request.line_integration,
                    voltage_v=request.voltage_v,
                    current_a=request.current_a,
                )
                brightness, contrast = self.direct.detector_levels(names)
            else:
                images, brightness, contrast = grab_one_by_one(self.m, request)
            return images, brightness, contrast, time.monotonic() - t0

        images, brightness, contrast, frame_s = await self._run("acquire", grab)
        state = await self.state()
        meta = AcquisitionMetadata(
            detectors=names,
            width_px=request.width_px,
            height_px=request.height_px,
            pixel_size_m=request.pixel_size_m,
            dwell_s=request.dwell_s,
            line_integration=request.line_integration,
            voltage_v=request.voltage_v,
            current_a=request.current_a,
            working_distance_m=state.working_distance_m,
            brightness=brightness,
            contrast=contrast,
            beam_shift=state.beam_shift,
            face_position_m=state.face_position_m,
            slice_index=self.book.slices,
            frame_time_s=frame_s,
            timestamp=time.time(),
        )
        return Acquisition(images, meta)

    async def auto_function(
        self, request: AutoFunctionRequest, *, deadline_s: float | None = None
    ) -> AutoFunctionResult:
        def run() -> float:
            t0 = time.monotonic()
            if request.detector is not None:
                self.m.set_detector_type(DETECTOR_TYPES[request.detector], self._e)
            if request.function == "focus":
                self.m.auto_focus(self._e)
            elif request.function == "contrast_brightness":
                self.m.autocontrast(self._e)
            elif self.direct is not None:
                self.direct.auto_stigmation()
            else:
                raise Unsupported(
                    f"auto stigmation is not available on the {self.backend} backend",
                    detail={"verb": "auto_function", "field": "function"},
                )
            return time.monotonic() - t0

        duration = await self._run("auto_function", run)
        return AutoFunctionResult(
            function=request.function,
            duration_s=duration,
            working_distance_m=float(self.m.get_working_distance(self._e)),
            brightness=float(self.m.get_detector_brightness(self._e)),
            contrast=float(self.m.get_detector_contrast(self._e)),
        )

    async def edx_map(self, request: EdxRequest, *, deadline_s: float | None = None) -> EdxResult:
        # Neither OpenFIBSEM nor AutoScript drives the EDX detector (it has its own vendor software).
        raise Unsupported("EDX maps are not available through the bridge", detail={"verb": "edx_map"})

    # --- stop and safe state ------------------------------------------------------------------------

    async def stop(self, *, deadline_s: float | None = None) -> StopResult:
        """Not exclusive: it must reach a running verb. Stops patterning, which ends mill/polish/deposit.

        While a destructive verb is still running the stop is repeated, so a pattern that was about to
        start when the first stop landed is stopped as soon as it runs."""
        busy = self._busy
        self._stop.set()

        def halt() -> None:
            give_up = time.monotonic() + STOP_REPEAT_S
            while True:
                if self.direct is not None:
                    self.direct.stop_patterning()
                else:
                    self.m.stop_milling()
                if self._busy not in DESTRUCTIVE or time.monotonic() > give_up:
                    return
                time.sleep(STOP_POLL_S)

        await self._run("stop", halt, exclusive=False)
        return StopResult(stopped=busy)

    async def safe_state(self, *, deadline_s: float | None = None) -> SafeStateResult:
        await self.stop()

        def secure() -> tuple[bool, bool, bool]:
            if self.direct is not None:
                return self.direct.safe_state()
            self.m.blank(self._e)
            self.m.blank(self._i)
            return True, True, True

        stopped, blanked, retracted = await self._run("safe_state", secure, exclusive=False)
        return SafeStateResult(patterning_stopped=stopped, beams_blanked=blanked, gis_retracted=retracted)
