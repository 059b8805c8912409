"""Generic OpenFIBSEM operations of the bridge (every backend without AutoScript: Tescan, the Demo).

Plus the conversions both paths share: a StageMove as an OpenFIBSEM position (explicit axes only) and
8-bit frames widened to the daemon's 16 bits.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from kintsugi_daemon.drivers.base import Aborted, AcquireRequest, InvalidRequest, StageMove
from kintsugi_daemon.drivers.bridge.autoscript import DETECTOR_TYPES, PatternJob

__all__ = ["fibsem_position", "grab_one_by_one", "run_pattern", "to_uint16"]


def run_pattern(
    m: Any, job: PatternJob, current_a: float, voltage_v: float, stopped: threading.Event
) -> None:
    """Run one pattern to its end through OpenFIBSEM's `run_milling` (blocking): Aborted if stopped.

    `stop_milling` from another thread ends `run_milling`; a stop landing between our check and the
    start is caught by the caller repeating `stop_milling` until this returns (BridgeDualBeam.stop)."""
    from fibsem.structures import (
        BeamType,
        CrossSectionPattern,
        FibsemMillingSettings,
        FibsemRectangleSettings,
    )

    channel = BeamType.ELECTRON if job.beam == "electron" else BeamType.ION
    hfw = max(job.width_m, job.height_m) * 2.0
    m.setup_milling(
        FibsemMillingSettings(
            milling_current=current_a,
            milling_voltage=voltage_v,
            hfw=hfw,
            application_file=job.application_file,  # checked at start (check_application_files)
            milling_channel=channel,
        )
    )
    cross = {
        "cleaning_cross_section": CrossSectionPattern.CleaningCrossSection,
        "regular_cross_section": CrossSectionPattern.RegularCrossSection,
        "rectangle": CrossSectionPattern.Rectangle,
    }[job.kind]
    m.draw_rectangle(
        FibsemRectangleSettings(
            width=job.width_m,
            height=job.height_m,
            depth=job.depth_m,
            centre_x=job.center_x_m,
            centre_y=job.center_y_m,
            cross_section=cross,
        )
    )
    if stopped.is_set():
        m.clear_patterns()
        raise Aborted(f"{job.kind} stopped before it started")
    m.run_milling(milling_current=current_a, milling_voltage=voltage_v)
    if stopped.is_set():
        raise Aborted(f"{job.kind} stopped")


def grab_one_by_one(
    m: Any, request: AcquireRequest
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Backends without a multi-view grab: the same frame settings, one detector after another."""
    from fibsem.structures import BeamType, ImageSettings

    e = BeamType.ELECTRON
    available = list(m.get_available_values("detector_type", e))
    images: dict[str, np.ndarray] = {}
    brightness: dict[str, float] = {}
    contrast: dict[str, float] = {}
    m.set_beam_voltage(request.voltage_v, e)
    m.set_beam_current(request.current_a, e)
    for det in request.detectors:
        kind = DETECTOR_TYPES[det.name]
        if kind not in available:
            raise InvalidRequest(
                f"detector {det.name} ({kind}) is not on this instrument (it has {available})",
                detail={"field": "detectors"},
            )
        m.set_detector_type(kind, e)
        if det.brightness is not None:
            m.set_detector_brightness(det.brightness, e)
        if det.contrast is not None:
            m.set_detector_contrast(det.contrast, e)
        image = m.acquire_image(
            ImageSettings(
                beam_type=e,
                resolution=(request.width_px, request.height_px),
                dwell_time=request.dwell_s,
                hfw=request.width_px * request.pixel_size_m,
                line_integration=request.line_integration if request.line_integration > 1 else None,
            )
        )
        images[det.name] = to_uint16(np.asarray(image.data))
        brightness[det.name] = float(m.get_detector_brightness(e))
        contrast[det.name] = float(m.get_detector_contrast(e))
    return images, brightness, contrast


def fibsem_position(move: StageMove) -> Any:
    """StageMove -> FibsemStagePosition (radians). An axis left out stays None, so it is not moved."""
    from fibsem.structures import FibsemStagePosition

    def rad(deg: float | None) -> float | None:
        return None if deg is None else math.radians(deg)

    return FibsemStagePosition(
        x=move.x_m,
        y=move.y_m,
        z=move.z_m,
        r=rad(move.rotation_deg),
        t=rad(move.tilt_deg),
        coordinate_system="RAW",
    )


def to_uint16(data: np.ndarray) -> np.ndarray:
    """8-bit frames (the Demo's, some detectors') scaled to the 16-bit range the daemon stores."""
    if data.dtype == np.uint16:
        return data
    if data.dtype == np.uint8:
        return np.asarray(data.astype(np.uint16) * 257, dtype=np.uint16)
    return np.asarray(np.clip(data, 0, 65535), dtype=np.uint16)
