"""Imaging verbs of the simulated DualBeam: acquire (all detectors of one scan), auto functions, EDX maps.

The physics is in `simulator.imaging` and `simulator.detectors`; this module turns requests into imaging
conditions (drift, beam shift, focus, astigmatism, the face's curtaining) and charges the frame time.
"""

from __future__ import annotations

import asyncio
import time

from kintsugi_daemon import instrument as timing
from kintsugi_daemon.drivers.base import Aborted as AbortedError
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    Acquisition,
    AcquisitionMetadata,
    AutoFunctionRequest,
    AutoFunctionResult,
    EdxRequest,
    EdxResult,
    InvalidRequest,
)
from kintsugi_daemon.instrument import SIN_SEM_FIB
from simulator.fiducial import paint_fiducial
from simulator.imaging import (
    DetectorSetting,
    ImagingConditions,
    auto_contrast_brightness,
    render,
    render_edx,
)
from simulator.operations import InstrumentCore, _finish

__all__ = ["ImagingVerbs"]

ASTIGMATISM_WALK_M = 0.5e-6  # astigmatic focal difference random walk per frame


class ImagingVerbs(InstrumentCore):
    """acquire, auto_function and edx_map over the core's state."""

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
                state=self._state_after(),
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
