"""The instrument API's contract as a client sees it, against a real simulator process: the OpenAPI
document declares the bearer scheme and every error the server really answers; degenerate values and
malformed JSON get the project's 422 body naming the field; and Schemathesis, generating requests from
that document (bounded in examples and time), finds no server error and no response that contradicts it.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.drivers.server import _STATUS, ERROR_RESPONSES
from tests.support.simulator import SimStarter, auth

AREA = {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 12e-6, "height_m": 10e-6}
MILL = {"pattern": "rectangle", "area": AREA, "slice_thickness_m": 40e-9, "current_a": 1e-9, "species": "xe"}
# Schemathesis in CI: enough to cover every operation (coverage phase: boundaries, missing and wrong
# fields) plus some fuzzing, well inside the suite's budget on two cores.
ST_MAX_EXAMPLES = 8
ST_MAX_TIME_S = 60


async def test_openapi_declares_the_bearer_scheme_and_every_error(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        spec = (await http.get("/v1/openapi.json")).json()  # public: no token needed
    schemes = spec["components"]["securitySchemes"]
    assert schemes == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": schemes["HTTPBearer"]["description"],
        }
    }
    error_ref = "#/components/schemas/ErrorBody"
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert operation["security"] == [{"HTTPBearer": []}], (method, path)
            for status in ("401", "409", "413", "422", "501", "502", "503", "504"):
                body = operation["responses"][status]["content"]["application/json"]["schema"]
                assert body == {"$ref": error_ref}, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's own 422 shape is not ours
    # Every status an instrument error maps to (and 413 from the body guard) is documented.
    assert set(ERROR_RESPONSES) == {*_STATUS.values(), 413}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/ion-beam", {"species": "xe", "current_a": 5e-324, "voltage_v": 30000}, "current_a"),
        ("/v1/mill", {**MILL, "current_a": 5e-324}, "current_a"),
        ("/v1/mill", {**MILL, "area": {**AREA, "width_m": 0.0}}, "area.width_m"),  # zero area
        ("/v1/mill", {**MILL, "area": {**AREA, "height_m": 5e-324}}, "area.height_m"),
        ("/v1/mill", {**MILL, "slice_thickness_m": 1e-300}, "slice_thickness_m"),
        (
            "/v1/deposit",
            {"area": {**AREA, "width_m": 1e-300}, "thickness_m": 1e-7, "beam": "ion"},
            "area.width_m",
        ),
        ("/v1/deposit", {"area": AREA, "thickness_m": 5e-324, "beam": "ion"}, "thickness_m"),
        (
            "/v1/edx",
            {
                "elements": ["Ni"],
                "voltage_v": 15000,
                "current_a": 5e-324,
                "step_m": 1e-7,
                "dwell_s": 1e-5,
                "width_m": 1e-6,
                "height_m": 1e-6,
            },
            "current_a",
        ),
    ],
)
async def test_degenerate_values_are_refused_naming_the_field(
    sim: SimulatorProcess, path: str, body: dict[str, Any], field: str
) -> None:
    """Mutation seen red: the floors (MIN_BEAM_CURRENT_A, MIN_PATTERN_M) set to 5e-324, i.e. `gt=0`."""
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        before = (await http.get("/test/face")).json()
        resp = await http.post(path, json=body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["kind"] == "invalid_request" and resp.json()["detail"]["field"] == field
        assert (await http.get("/test/face")).json() == before  # nothing was milled or deposited


async def test_a_degenerate_deadline_is_refused(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.get("/v1/state", headers={"X-Deadline-S": "1e-300"})
    assert resp.status_code == 422 and resp.json()["detail"]["field"] == "x-deadline-s"


@pytest.mark.parametrize(
    "content",
    [b"\x13\xff\xfeY", b'{"x_m": 1e-6, "y_m": ', b"not json", b"[1, 2", b'{"x_m": 1e-6} trailing'],
)
async def test_malformed_json_gets_the_project_error_body(sim: SimulatorProcess, content: bytes) -> None:
    """Bytes that are not JSON (FastAPI answers them 400 with its own shape) get the same 422 body as
    every other bad request. Mutation seen red: the 400 branch of the HTTP error handler removed."""
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.post(
            "/v1/beam-shift", content=content, headers={"Content-Type": "application/json"}
        )
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["kind"] == "invalid_request" and body["detail"]["field"] == "body" and body["message"]


async def test_method_not_allowed_says_which_are(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.request("TRACE", "/v1/state")
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    assert resp.json()["kind"] == "invalid_request"


async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    start_sim: SimStarter, tmp_path: Path
) -> None:
    """Every check but `positive_data_acceptance`: the instrument refuses some schema-valid requests by
    its state (a beam shift beyond the current limit, a species the column is not running, a mill past the
    simulated specimen), with 422 naming the field; no schema can say that. The deadline header is fixed
    so a slow CI machine never turns a generated 1 ms deadline into a 504 (deadlines have their own tests)."""
    st = Path(sys.executable).with_name("st")
    # Without --test-endpoints: the fault-injection endpoints are not part of the API under test.
    async with start_sim("--time-scale", "0") as sim:
        text, code = await _schemathesis(st, sim, tmp_path)
    assert code == 0, text[-6000:]
    assert "14/14" in text and " passed" in text, text[-3000:]  # every operation (mill-fiducial too)


async def _schemathesis(st: Path, sim: SimulatorProcess, tmp_path: Path) -> tuple[str, int]:
    proc = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{sim.url}/v1/openapi.json",
        *("-H", f"Authorization: Bearer {sim.token}", "-H", "X-Deadline-S: 600"),
        *("--max-examples", str(ST_MAX_EXAMPLES), "--max-time", str(ST_MAX_TIME_S), "--seed", "0"),
        *("--workers", "1", "--request-timeout", "60", "--generation-database", "none", "--no-color"),
        *("--exclude-checks", "positive_data_acceptance"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), ST_MAX_TIME_S + 120)
    return out.decode(errors="replace"), proc.returncode or 0
