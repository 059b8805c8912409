"""Every verb of the instrument API, round-tripped through the real client to a real simulator process."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    AutoFunctionRequest,
    BeamShift,
    DepositRequest,
    DetectorSettings,
    EdxRequest,
    IonBeamSettings,
    MillRequest,
    PolishRequest,
    Rectangle,
    StageMove,
)
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.drivers.tiff_wire import decode_channels
from simulator.materials import CANONICAL_CLASSES, OUTSIDE_LABEL
from tests.support.simulator import auth

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=12e-6, height_m=10e-6)
ACQUIRE = AcquireRequest(
    detectors=[DetectorSettings(name="cbs"), DetectorSettings(name="tld")],
    width_px=256,
    height_px=192,
    pixel_size_m=40e-9,
    dwell_s=3e-6,
    voltage_v=5000.0,
    current_a=5e-9,
)


async def ground_truth(sim: SimulatorProcess) -> np.ndarray:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.get("/test/ground-truth")
        resp.raise_for_status()
    channels, meta = decode_channels(resp.content)
    assert meta["classes"] == CANONICAL_CLASSES
    return channels["labels"]


async def test_full_cycle_round_trip(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    ident = await scope.identity()
    assert ident.simulated and "Hydra" in ident.model

    before = await scope.state()
    assert before.vacuum == "pumped" and before.face_position_m == 0.0

    moved = await scope.move_stage(StageMove(mode="relative", y_m=1e-6))
    assert moved.y_m == pytest.approx(before.stage.y_m + 1e-6)
    assert moved.x_m == before.stage.x_m  # an axis left out is left alone, never zeroed
    assert moved.tilt_deg == before.stage.tilt_deg

    ion = await scope.set_ion_beam(IonBeamSettings(species="xe", current_a=15e-9, voltage_v=30000.0))
    assert ion.current_a == pytest.approx(15e-9)

    dep = await scope.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
    assert dep.infiltration_depth_m > 0 and dep.cap_thickness_m > before.pt_cap_thickness_m

    mill = await scope.mill(
        MillRequest(
            pattern="cleaning_cross_section",
            area=AREA,
            slice_thickness_m=40e-9,
            current_a=15e-9,
            species="xe",
        )
    )
    assert mill.completed and 20e-9 <= mill.removed_m <= 60e-9
    assert mill.face_position_m == pytest.approx(mill.removed_m)

    polish = await scope.polish(PolishRequest(area=AREA, current_a=1e-9, species="xe"))
    assert polish.face_position_m > mill.face_position_m

    shift = await scope.set_beam_shift(BeamShift(x_m=0.0, y_m=-30e-9))
    assert shift.y_m == -30e-9

    focus = await scope.auto_function(AutoFunctionRequest(function="focus"))
    assert focus.working_distance_m > before.working_distance_m  # the face receded from the lens
    await scope.auto_function(AutoFunctionRequest(function="stigmation"))

    acq = await scope.acquire(ACQUIRE)
    assert set(acq.images) == {"cbs", "tld"}
    for image in acq.images.values():
        assert image.dtype == np.uint16 and image.shape == (192, 256)
        assert image.std() > 100  # a real rendered face, not a blank frame
    assert acq.metadata.detectors == ["cbs", "tld"]
    assert acq.metadata.face_position_m == pytest.approx(polish.face_position_m)
    assert acq.metadata.slice_index == 1

    labels = await ground_truth(sim)
    assert labels.shape == (192, 256)
    assert set(np.unique(labels)) <= {*CANONICAL_CLASSES.values(), OUTSIDE_LABEL}
    assert (labels == CANONICAL_CLASSES["pore"]).any()  # Pt reached the pores behind the old face
    assert (labels == CANONICAL_CLASSES["active"]).any()
    # Ground truth is aligned with the image: Pt-filled pores are the brightest CBS phase.
    cbs = acq.images["cbs"].astype(float)
    assert cbs[labels == CANONICAL_CLASSES["pore"]].mean() > cbs[labels == CANONICAL_CLASSES["active"]].mean()

    cb = await scope.auto_function(AutoFunctionRequest(function="contrast_brightness", detector="cbs"))
    assert cb.brightness is not None and cb.contrast is not None

    edx = await scope.edx_map(
        EdxRequest(
            elements=["Ni", "Al", "Pt", "C", "F"],
            voltage_v=10000.0,
            current_a=1.6e-9,
            step_m=54e-9,
            dwell_s=1e-4,
            width_m=256 * 40e-9,
            height_m=192 * 40e-9,
        )
    )
    assert set(edx.maps) == {"Ni", "Al", "Pt", "C", "F"}
    assert edx.maps["Ni"].sum() > 0 and edx.step_m == 54e-9

    stopped = await scope.stop()
    assert stopped.stopped is None  # nothing was running
    safe = await scope.safe_state()
    assert safe.patterning_stopped and safe.beams_blanked and safe.gis_retracted
    after = await scope.state()
    assert not after.electron_beam_on and not after.ion_beam_on and not after.gis.inserted
    assert after.instrument_time_s > 0


async def test_token_required(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        missing = await http.get("/v1/state")
        wrong = await http.get("/v1/state", headers={"Authorization": "Bearer nope"})
        ok = await http.get("/v1/state", headers=auth(sim))
    assert missing.status_code == 401 and missing.json()["kind"] == "unauthorized"
    assert wrong.status_code == 401
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/v1/mill",
            {
                "pattern": "rectangle",
                "area": AREA.model_dump(),
                "slice_thickness_m": 4e-8,
                "current_a": 1.5e-8,
                "species": "xe",
                "speed": 2,
            },
            "speed",
        ),  # unknown field
        (
            "/v1/mill",
            {
                "pattern": "rectangle",
                "area": AREA.model_dump(),
                "slice_thickness_m": 40,
                "current_a": 1.5e-8,
                "species": "xe",
            },
            "slice_thickness_m",
        ),  # nm given as metres
        ("/v1/ion-beam", {"species": "xe", "current_a": 15, "voltage_v": 30000}, "current_a"),  # nA, not A
        ("/v1/ion-beam", {"species": "ga", "current_a": 1e-9, "voltage_v": 30000}, "species"),
        ("/v1/stage/move", {"mode": "absolute", "tilt_deg": 120}, "tilt_deg"),
        ("/v1/stage/move", {"mode": "absolute"}, "body"),  # no axis at all
        ("/v1/beam-shift", {"x_m": "0", "y_m": 0.0}, "x_m"),  # no coercion from strings
        ("/v1/acquire", {**ACQUIRE.model_dump(), "dwell_s": -1}, "dwell_s"),
    ],
)
async def test_bad_requests_name_the_field(
    sim: SimulatorProcess, path: str, body: dict[str, object], field: str
) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.post(path, json=body)
        assert resp.status_code == 422, resp.text
        err = resp.json()
        assert err["kind"] == "invalid_request"
        assert field in err["detail"]["fields"] or err["detail"]["field"].endswith(field)
        assert (await http.get("/v1/state")).status_code == 200  # the simulator lives on


async def test_nan_oversized_and_bad_deadline_refused(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        nan = await http.post(
            "/v1/beam-shift", content=b'{"x_m": NaN, "y_m": 0}', headers={"Content-Type": "application/json"}
        )
        assert nan.status_code == 422
        big = await http.post(
            "/v1/beam-shift",
            content=b"{" + b" " * 100_000 + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
        deadline = await http.get("/v1/state", headers={"X-Deadline-S": "-3"})
        assert deadline.status_code == 422 and deadline.json()["detail"]["field"] == "x-deadline-s"
        assert (await http.get("/v1/state")).status_code == 200


async def test_beam_shift_limit_is_instrument_error(scope: HttpDualBeam) -> None:
    from kintsugi_daemon.drivers.base import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        await scope.set_beam_shift(BeamShift(x_m=50e-6, y_m=0.0))
    assert err.value.detail["field"] == "x_m"


async def test_openapi_lists_every_verb(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        spec = (await http.get("/v1/openapi.json")).json()
    paths = set(spec["paths"])
    for verb in (
        "identity",
        "state",
        "stage/move",
        "ion-beam",
        "beam-shift",
        "deposit",
        "mill",
        "polish",
        "acquire",
        "auto-function",
        "edx",
        "stop",
        "safe-state",
    ):
        assert f"/v1/{verb}" in paths
    assert "slice_thickness_m" in spec["components"]["schemas"]["MillRequest"]["properties"]
    assert "image/tiff" in spec["paths"]["/v1/acquire"]["post"]["responses"]["200"]["content"]


async def test_client_with_wrong_token_reports_unauthorized(sim: SimulatorProcess) -> None:
    from kintsugi_daemon.drivers.base import CommsLost, Unauthorized

    async with HttpDualBeam(sim.url, token="wrong") as bad:
        with pytest.raises(Unauthorized, match="token") as err:
            await bad.state()
    assert not isinstance(err.value, CommsLost)  # a configuration error, not a link to retry


async def test_many_concurrent_state_reads(scope: HttpDualBeam) -> None:
    states = await asyncio.gather(*(scope.state() for _ in range(20)))
    assert len({s.face_position_m for s in states}) == 1
