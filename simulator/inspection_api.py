"""Test-only endpoints of the simulator (served only with `--test-endpoints`).

Ground truth of the current face aligned with the last image, fault injection, and a look at the face.
A real bridge never serves these; a daemon must never depend on them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from kintsugi_daemon.drivers.tiff_wire import TIFF_MEDIA_TYPE, encode_channels
from simulator.faults import FaultSpec
from simulator.instrument import SimulatedDualBeam, check_fault_applicable
from simulator.materials import CANONICAL_CLASSES

__all__ = ["TEST_PREFIX", "DriftStep", "test_router"]


class DriftStep(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    dx_m: float = Field(ge=-20e-6, le=20e-6)
    dy_m: float = Field(ge=-20e-6, le=20e-6)


TEST_PREFIX = "/test"


def test_router(sim: SimulatedDualBeam) -> APIRouter:
    router = APIRouter(prefix=TEST_PREFIX, tags=["test-only"])

    @router.get(
        "/ground-truth",
        response_class=Response,
        responses={200: {"content": {TIFF_MEDIA_TYPE: {}}}, 404: {"description": "no image yet"}},
    )
    async def ground_truth() -> Response:
        if sim.last_labels is None:
            return JSONResponse(
                status_code=404,
                content={"kind": "invalid_request", "message": "no image acquired yet", "detail": {}},
            )
        data = encode_channels({"labels": sim.last_labels}, {"classes": CANONICAL_CLASSES})
        return Response(content=data, media_type=TIFF_MEDIA_TYPE)

    @router.post("/faults")
    async def inject(spec: FaultSpec) -> dict[str, Any]:
        check_fault_applicable(spec)  # InvalidRequest (422) for a fault its verb can never show
        sim.faults.arm(spec)
        return sim.face_report()["faults"]  # type: ignore[return-value]

    @router.delete("/faults")
    async def clear() -> dict[str, Any]:
        sim.faults.clear()
        return sim.face_report()["faults"]  # type: ignore[return-value]

    @router.get("/truth")
    async def truth() -> list[dict[str, float]]:
        """Per image, in order: field-of-view error against an ideal run, drift, defocus, astigmatism,
        face position, pore pixels filled/unfilled, instrument time (ground truth for the adaptive loop)."""
        return sim.truth

    @router.post("/drift")
    async def inject_drift(step: DriftStep) -> dict[str, Any]:
        sim.inject_drift(step.dx_m, step.dy_m)
        return sim.face_report()

    @router.delete("/fiducial")
    async def lose_fiducial() -> dict[str, Any]:
        """The fiducial is gone (sputtered away, covered by redeposition): the daemon must suspend."""
        sim.fiducial = None
        return sim.face_report()

    @router.get("/face")
    async def face() -> dict[str, Any]:
        return sim.face_report()

    @router.get("/busy")
    async def busy(since_s: float = 0.0) -> dict[str, Any]:
        """Operations that ended after `since_s` (time.monotonic of this machine), and the time scale:
        a benchmark computes the instrument's idle time on the instrument's own clock from these."""
        return {
            "now_s": time.monotonic(),
            "time_scale": sim.settings.time_scale,
            "instrument_time_s": sim.face_report()["instrument_time_s"],
            "intervals": [asdict(b) for b in sim.busy_log if b.end_s > since_s],
        }

    return router
