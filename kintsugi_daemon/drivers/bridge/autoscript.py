"""Direct AutoScript calls (thermo backend) where OpenFIBSEM has no verb, or one unfit to run unattended.

They go through the AutoScript client OpenFIBSEM's `ThermoMicroscope` already holds (`.connection`):
- simultaneous multi-detector grabs (`grab_multiple_frames`, CBS + TLD in one scan): OpenFIBSEM grabs one
  view at a time;
- Pt deposition with the GIS (insert, heater, pattern, valve, retract): OpenFIBSEM has cryo deposition only;
- plasma gas switching, then the new species' voltage and current;
- patterning whose stop really stops: OpenFIBSEM's `run_milling` waits for the state to leave Idle before it
  watches for the end, so a stop landing before the start leaves it spinning; pattern creation can return a
  zero-size pattern (retried here); the application file is set before every pattern;
- the electron beam shift, written as one whole Point; auto-stigmation.

DOMAIN.md's traps: the active view is one global setting, so every set-view-then-act pair runs under one
lock, OpenFIBSEM's own `_threading_lock` (shared by every caller in the process), so these calls and
OpenFIBSEM's never interleave. Application files are checked once at start (`check_application_files`).
Blocking calls: run them in a worker thread. `stop_patterning` may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from kintsugi_daemon.drivers.base import Aborted, InstrumentFault, InvalidRequest

__all__ = [
    "DETECTOR_MODES",
    "DETECTOR_TYPES",
    "ELECTRON_VIEW",
    "ION_VIEW",
    "PLASMA_GASES",
    "AutoScriptStructures",
    "AutoScriptVerbs",
    "DetectorSetup",
    "PatternJob",
]

# xT's quad views: OpenFIBSEM's set_channel uses view 1 for the electron beam and view 2 for the ion beam;
# the device numbers are AutoScript's ImagingDevice (ELECTRON_BEAM = 1, ION_BEAM = 2).
ELECTRON_VIEW = 1
ION_VIEW = 2
ELECTRON_DEVICE = 1
ION_DEVICE = 2
DETECTOR_TYPES = {"cbs": "CBS", "tld": "TLD", "etd": "ETD", "ice": "ICE"}
DETECTOR_MODES = {
    "backscatter": "BackscatterElectrons",
    "secondary": "SecondaryElectrons",
    "ion": "SecondaryIons",
}
PLASMA_GASES = {"xe": "Xenon", "o": "Oxygen", "ar": "Argon", "n": "Nitrogen"}
PT_GIS_PORT = "Pt dep"
ZERO_SIZE_RETRIES = 3  # create_* has been seen to return a 0 x 0 pattern; a fresh attempt succeeds
START_GRACE_S = 2.0  # after start() the state may read Idle for a moment before Running
POLL_S = 0.2


class AutoScriptStructures(Protocol):
    """The AutoScript structures we build (injected: the real module exists only on the microscope PC)."""

    def GrabFrameSettings(self, **kwargs: Any) -> Any: ...  # noqa: N802 (AutoScript's class names)
    def Point(self, x: float, y: float) -> Any: ...  # noqa: N802


class RealStructures:
    """`autoscript_sdb_microscope_client.structures`, imported on first use."""

    def GrabFrameSettings(self, **kwargs: Any) -> Any:  # noqa: N802
        from autoscript_sdb_microscope_client.structures import GrabFrameSettings

        return GrabFrameSettings(**kwargs)

    def Point(self, x: float, y: float) -> Any:  # noqa: N802
        from autoscript_sdb_microscope_client.structures import Point

        return Point(x, y)


@dataclass(frozen=True)
class DetectorSetup:
    name: str  # one of DETECTOR_TYPES
    mode: str | None = None  # one of DETECTOR_MODES, None: keep the instrument's
    brightness: float | None = None
    contrast: float | None = None


@dataclass(frozen=True)
class PatternJob:
    kind: Literal["rectangle", "cleaning_cross_section", "regular_cross_section"]
    center_x_m: float
    center_y_m: float
    width_m: float
    height_m: float
    depth_m: float
    application_file: str
    beam: Literal["electron", "ion"] = "ion"
    current_a: float | None = None  # None: the beam's current as it is


class AutoScriptVerbs:
    """AutoScript calls on `connection` (an `SdbMicroscopeClient`); set-view-then-act pairs under `lock`."""

    def __init__(
        self,
        connection: Any,
        lock: AbstractContextManager[Any],
        structures: AutoScriptStructures | None = None,
        *,
        poll_s: float = POLL_S,
        start_grace_s: float = START_GRACE_S,
    ) -> None:
        self.c = connection
        self.lock = lock
        self.s: AutoScriptStructures = structures or RealStructures()
        self.poll_s = poll_s
        self.start_grace_s = start_grace_s
        self._stop = threading.Event()
        self._started = False  # a pattern of ours was started and may still be running

    # --- checks at start ----------------------------------------------------------------------------

    def check_application_files(self, needed: Sequence[str]) -> None:
        """Refuse to start with an application file the instrument does not have (it fails mid-run else)."""
        available = set(self.c.patterning.list_all_application_files())
        missing = sorted(set(needed) - available)
        if missing:
            raise ValueError(
                f"application files {missing} are not on this instrument (it has {sorted(available)}); "
                "map them with --application-file KEY=NAME"
            )

    # --- imaging ------------------------------------------------------------------------------------

    def grab(
        self,
        detectors: Sequence[DetectorSetup],
        *,
        width_px: int,
        height_px: int,
        pixel_size_m: float,
        dwell_s: float,
        line_integration: int,
        voltage_v: float,
        current_a: float,
    ) -> dict[str, np.ndarray]:
        """One scan, every detector at once: one view per detector, then `grab_multiple_frames`."""
        beam = self.c.beams.electron_beam
        views = list(range(1, len(detectors) + 1))
        with self.lock:  # the views are set and grabbed as one: nobody may switch a view in between
            beam.high_voltage.value = voltage_v
            beam.beam_current.value = current_a
            beam.horizontal_field_width.value = width_px * pixel_size_m
            for view, det in zip(views, detectors, strict=True):
                self.c.imaging.set_active_view(view)
                self.c.imaging.set_active_device(ELECTRON_DEVICE)
                self.c.detector.type.value = DETECTOR_TYPES[det.name]
                if det.mode is not None:
                    self.c.detector.mode.value = DETECTOR_MODES[det.mode]
                if det.brightness is not None:
                    self.c.detector.brightness.value = det.brightness
                if det.contrast is not None:
                    self.c.detector.contrast.value = det.contrast
            settings = self.s.GrabFrameSettings(
                resolution=f"{width_px}x{height_px}",
                dwell_time=dwell_s,
                bit_depth=16,
                line_integration=line_integration,
                views=views,
            )
            images = self.c.imaging.grab_multiple_frames(settings)
        if len(images) != len(detectors):
            raise InstrumentFault(
                f"grab_multiple_frames returned {len(images)} images for {len(views)} views"
            )
        return {
            det.name: np.asarray(img.data, dtype=np.uint16)
            for det, img in zip(detectors, images, strict=True)
        }

    def detector_levels(self, detectors: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
        """Brightness and contrast of each detector as the views hold them after `grab`."""
        brightness, contrast = {}, {}
        with self.lock:
            for view, name in enumerate(detectors, start=1):
                self.c.imaging.set_active_view(view)
                brightness[name] = float(self.c.detector.brightness.value)
                contrast[name] = float(self.c.detector.contrast.value)
        return brightness, contrast

    def auto_stigmation(self) -> None:
        with self.lock:
            self.c.imaging.set_active_view(ELECTRON_VIEW)
            self.c.imaging.set_active_device(ELECTRON_DEVICE)
            self.c.auto_functions.run_auto_stigmator()

    # --- beams --------------------------------------------------------------------------------------

    def set_beam_shift(self, x_m: float, y_m: float) -> tuple[float, float]:
        """One write of a whole Point: two axis writes would pass through a shift nobody asked for."""
        shift = self.c.beams.electron_beam.beam_shift
        shift.value = self.s.Point(x_m, y_m)
        now = shift.value
        return float(now.x), float(now.y)

    def beam_shift_limit_m(self) -> float:
        limits = self.c.beams.electron_beam.beam_shift.limits
        return float(
            min(abs(limits.limits_x.min), limits.limits_x.max, abs(limits.limits_y.min), limits.limits_y.max)
        )

    def set_ion_beam(self, species: str, voltage_v: float, current_a: float) -> float:
        """Switch the plasma gas if needed (minutes), then voltage and current. Returns the switch time."""
        gas = PLASMA_GASES[species]
        source = self.c.beams.ion_beam.source.plasma_gas
        t0 = time.monotonic()
        if source.value != gas:
            available = list(source.available_values)
            if gas not in available:
                raise InvalidRequest(
                    f"plasma gas {gas} is not available on this instrument ({available})",
                    detail={"field": "species"},
                )
            source.value = gas  # blocks until the source has switched
        self.c.beams.ion_beam.high_voltage.value = voltage_v
        self.c.beams.ion_beam.beam_current.value = current_a
        return time.monotonic() - t0

    def ion_state(self) -> tuple[str | None, float, float]:
        gas = self.c.beams.ion_beam.source.plasma_gas.value
        species = next((k for k, v in PLASMA_GASES.items() if v == gas), None)
        beam = self.c.beams.ion_beam
        return species, float(beam.beam_current.value), float(beam.high_voltage.value)

    # --- patterning ---------------------------------------------------------------------------------

    def reset_stop(self) -> None:
        self._stop.clear()

    def stop_patterning(self) -> bool:
        """Stop what we patterned (from any thread). True if a pattern of ours was started."""
        with self.lock:  # so a start cannot slip in between our flag and the stop
            self._stop.set()
            started = self._started
            if started:
                self.c.patterning.stop()
        return started

    def run_pattern(self, job: PatternJob, before_start: Callable[[], None] | None = None) -> None:
        """Create the pattern on the job's beam and run it to the end; Aborted if stopped."""
        p = self.c.patterning
        with self.lock:
            self._check_stop(job)
            self.c.imaging.set_active_view(ION_VIEW)
            self.c.imaging.set_active_device(ION_DEVICE)
            p.clear_patterns()
            p.set_default_beam_type(ELECTRON_DEVICE if job.beam == "electron" else ION_DEVICE)
            p.set_default_application_file(job.application_file)
            if job.current_a is not None:  # before creating: the pattern's dwell and time follow the current
                beam = self.c.beams.electron_beam if job.beam == "electron" else self.c.beams.ion_beam
                beam.beam_current.value = job.current_a
            self._create(job)
            if before_start is not None:
                before_start()
            p.start()  # a stop from another thread waits for the lock, then sees _started and stops it
            self._started = True
        try:
            self._wait_idle(job)
        finally:
            with self.lock:
                self._started = False
                self.c.imaging.set_active_view(ION_VIEW)
                p.clear_patterns()

    def _create(self, job: PatternJob) -> None:
        create = {
            "rectangle": self.c.patterning.create_rectangle,
            "cleaning_cross_section": self.c.patterning.create_cleaning_cross_section,
            "regular_cross_section": self.c.patterning.create_regular_cross_section,
        }[job.kind]
        for _ in range(ZERO_SIZE_RETRIES):
            pattern = create(
                center_x=job.center_x_m,
                center_y=job.center_y_m,
                width=job.width_m,
                height=job.height_m,
                depth=job.depth_m,
            )
            if pattern.width > 0 and pattern.height > 0:
                return
            self.c.patterning.clear_patterns()  # a 0 x 0 pattern would "complete" instantly: try again
        raise InstrumentFault(
            f"{job.kind}: the instrument created a zero-size pattern {ZERO_SIZE_RETRIES} times",
            detail={"pattern": job.kind},
        )

    def _check_stop(self, job: PatternJob) -> None:
        if self._stop.is_set():
            self.c.patterning.clear_patterns()
            raise Aborted(f"{job.kind} stopped before it started", detail={"pattern": job.kind})

    def _wait_idle(self, job: PatternJob) -> None:
        started = time.monotonic()
        seen_active = False
        while True:
            self._stop.wait(self.poll_s)
            with self.lock:  # the state is the active view's: read it with the ion view set
                self.c.imaging.set_active_view(ION_VIEW)
                state = str(self.c.patterning.state)
            if self._stop.is_set():
                raise Aborted(f"{job.kind} stopped", detail={"pattern": job.kind})
            if state.lower() != "idle":
                seen_active = True
            elif seen_active or time.monotonic() - started > self.start_grace_s:
                return

    # --- Pt deposition ------------------------------------------------------------------------------

    def deposit_pt(self, job: PatternJob, warmup_s: float) -> None:
        """GIS in, heater on and warm, pattern, valve open for the pattern, then valve, heater, GIS back."""
        gis = self.c.gas.get_gis_port(PT_GIS_PORT)
        gis.insert()
        try:
            gis.turn_heater_on()
            if self._stop.wait(warmup_s):
                raise Aborted("deposit_pt stopped while the GIS warmed up", detail={"verb": "deposit_pt"})
            try:
                self.run_pattern(job, before_start=gis.open)
            finally:
                gis.close()
        finally:
            gis.turn_heater_off()
            gis.retract()

    def safe_state(self) -> tuple[bool, bool, bool]:
        """Stop patterning, blank both beams, close and retract the Pt GIS."""
        self.stop_patterning()
        self.c.beams.electron_beam.blank()
        self.c.beams.ion_beam.blank()
        gis = self.c.gas.get_gis_port(PT_GIS_PORT)
        gis.close()
        gis.retract()
        return True, True, True
