"""Regression tests for the foundation review: request bounds, stop/cancel bookkeeping, the server's
guard and typed errors, client error mapping, atomic writes, process lifetime and the serve CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import pydantic
import pytest

from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.drivers import server as server_mod
from kintsugi_daemon.drivers.base import (
    Aborted,
    AcquireRequest,
    AutoFunctionRequest,
    CommsLost,
    DeadlineExceeded,
    DepositRequest,
    DetectorSettings,
    EdxRequest,
    ErrorBody,
    InstrumentBusy,
    InstrumentError,
    InvalidRequest,
    IonBeamSettings,
    MillRequest,
    PolishRequest,
    Rectangle,
    StageMove,
    StopResult,
    Unauthorized,
    error_from_body,
)
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.drivers.server import MAX_BODY_BYTES, build_app, check_bind, listen_socket, serve
from kintsugi_daemon.drivers.tiff_wire import TIFF_MEDIA_TYPE, encode_channels
from kintsugi_daemon.service.atomic import write_atomic, write_json_atomic
from simulator.factory import RunSize, make_simulator
from simulator.faults import FaultSpec
from simulator.instrument import SimulatedDualBeam
from tests.support.simulator import SimStarter, auth

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=12e-6, height_m=10e-6)
SLOW_MILL = MillRequest(pattern="rectangle", area=AREA, slice_thickness_m=40e-9, current_a=1e-9, species="xe")
SIZE = RunSize(width_px=192, height_px=128, slices=8)
EDX = {
    "elements": ["Ni"],
    "voltage_v": 10000.0,
    "current_a": 1e-9,
    "step_m": 50e-9,
    "dwell_s": 1e-4,
    "width_m": 10e-6,
    "height_m": 10e-6,
}
ACQUIRE = AcquireRequest(
    detectors=[DetectorSettings(name="cbs")],
    width_px=192,
    height_px=128,
    pixel_size_m=40e-9,
    dwell_s=3e-6,
    voltage_v=5000.0,
    current_a=5e-9,
)


@pytest.fixture
def make_sim(sim_cache: Path) -> Callable[[float], SimulatedDualBeam]:
    def make(time_scale: float) -> SimulatedDualBeam:
        return make_simulator(SIZE, time_scale=time_scale, cache_dir=sim_cache, seed=11)

    return make


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


# --- 1: request bounds --------------------------------------------------------------------------


def test_edx_grid_and_time_are_bounded() -> None:
    EdxRequest.model_validate(EDX)
    with pytest.raises(pydantic.ValidationError) as err:
        EdxRequest.model_validate({**EDX, "step_m": 6e-9, "width_m": 5e-4, "height_m": 5e-4})
    assert err.value.errors()[0]["loc"] == ("step_m",)
    with pytest.raises(pydantic.ValidationError) as err:  # a small grid but a day-long dwell
        EdxRequest.model_validate(
            {**EDX, "step_m": 1.5e-7, "width_m": 5e-4, "height_m": 5e-4, "dwell_s": 1e-2}
        )
    assert err.value.errors()[0]["loc"] == ("dwell_s",)


def test_acquire_frame_time_is_bounded() -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        AcquireRequest.model_validate(
            {**ACQUIRE.model_dump(), "width_px": 6144, "height_px": 4096, "dwell_s": 1e-3}
        )
    assert err.value.errors()[0]["loc"] == ("dwell_s",)


async def test_huge_edx_is_refused_over_http_and_the_simulator_lives(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.post("/v1/edx", json={**EDX, "step_m": 6e-9, "width_m": 5e-4, "height_m": 5e-4})
        assert resp.status_code == 422 and resp.json()["detail"]["field"] == "step_m"
        assert (await http.get("/v1/state")).status_code == 200


# --- 2, 7, 8, 11: stop, cancel and busy in the simulator ------------------------------------------


async def test_stop_aborts_stage_move_midway(make_sim: Callable[[float], SimulatedDualBeam]) -> None:
    sim = make_sim(1.0)
    x0 = sim._stage.x_m
    moving = asyncio.create_task(sim.move_stage(StageMove(mode="relative", x_m=1e-3)))  # ~3 s
    await until(lambda: sim._busy == "move_stage")
    await asyncio.sleep(0.3)
    await sim.stop()
    with pytest.raises(Aborted):
        await moving
    assert x0 < sim._stage.x_m < x0 + 1e-3  # where the move had got to, not the target


async def test_stop_aborts_ion_switch_and_auto_function(
    make_sim: Callable[[float], SimulatedDualBeam],
) -> None:
    sim = make_sim(0.02)
    before = (sim._column.species, sim._column.current_a)
    switching = asyncio.create_task(
        sim.set_ion_beam(IonBeamSettings(species="o", current_a=1e-9, voltage_v=30000.0))  # ~3.7 s
    )
    await until(lambda: sim._busy == "set_ion_beam")
    await sim.stop()
    with pytest.raises(Aborted):
        await switching
    assert (sim._column.species, sim._column.current_a) == before

    sim.settings = dataclasses.replace(sim.settings, time_scale=0.2)
    await sim.mill(
        MillRequest(pattern="rectangle", area=AREA, slice_thickness_m=40e-9, current_a=15e-9, species="xe")
    )
    wd = sim._optics.wd_set_m
    focusing = asyncio.create_task(sim.auto_function(AutoFunctionRequest(function="focus")))  # ~3 s
    await until(lambda: sim._busy == "auto_function")
    await sim.stop()
    with pytest.raises(Aborted):
        await focusing
    assert sim._optics.wd_set_m == wd


async def test_busy_is_its_own_error(make_sim: Callable[[float], SimulatedDualBeam]) -> None:
    sim = make_sim(1.0)
    milling = asyncio.create_task(sim.mill(SLOW_MILL))
    await until(lambda: sim._busy == "mill")
    with pytest.raises(InstrumentBusy) as err:
        await sim.acquire(ACQUIRE)
    assert err.value.detail["busy"] == "mill"
    await sim.stop()
    with pytest.raises(Aborted):
        await milling
    assert isinstance(error_from_body(ErrorBody(kind="busy", message="x")), InstrumentBusy)
    assert isinstance(error_from_body(ErrorBody(kind="unauthorized", message="x")), Unauthorized)


async def test_cancelled_mill_books_like_a_stopped_one(
    make_sim: Callable[[float], SimulatedDualBeam],
) -> None:
    sim = make_sim(1.0)
    sim._face.polish_passes = 3
    cap0 = sim._face.cap_m
    curtain0 = sim._face.curtain
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await sim.mill(SLOW_MILL)  # ~9 s
    assert 0.0 < sim._face.position_m < 40e-9
    assert sim._face.polish_passes == 0
    assert sim._face.cap_m == pytest.approx(cap0 - 2e-9)
    assert sim._face.curtain is not None and sim._face.curtain is not curtain0
    assert sim._face.slice_index == 0 and sim._busy is None
    assert not hasattr(sim, "cancelled_fraction")


async def test_cancelled_polish_and_deposit_book_the_part_done(
    make_sim: Callable[[float], SimulatedDualBeam],
) -> None:
    sim = make_sim(1.0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await sim.polish(PolishRequest(area=AREA, current_a=1e-10, species="xe"))
    assert 0.0 < sim._face.position_m < 5e-9 and sim._face.polish_passes == 0

    sim.settings = dataclasses.replace(sim.settings, time_scale=0.05)
    cap0 = sim._face.cap_m
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):  # ~1 s of the ~2.6 s deposit at this scale
            await sim.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
    assert cap0 < sim._face.cap_m < cap0 + 100e-9
    assert not sim._gis.inserted and not sim._gis.valve_open and sim._busy is None


async def test_safe_state_during_deposit_switches_the_heater_off(
    make_sim: Callable[[float], SimulatedDualBeam],
) -> None:
    sim = make_sim(0.05)
    depositing = asyncio.create_task(
        sim.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
    )
    await until(lambda: sim._gis.valve_open)
    await sim.safe_state()
    with pytest.raises(Aborted):
        await depositing
    assert not sim._gis.heater_on and not sim._gis.inserted and not sim._gis.valve_open


async def test_thread_work_keeps_the_instrument_busy(
    make_sim: Callable[[float], SimulatedDualBeam], monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulator.imaging_verbs as instrument_mod

    real_render = instrument_mod.render  # type: ignore[attr-defined]

    def slow_render(*args: Any) -> Any:
        time.sleep(0.6)
        return real_render(*args)

    monkeypatch.setattr(instrument_mod, "render", slow_render)
    sim = make_sim(0.0)
    acquiring = asyncio.create_task(sim.acquire(ACQUIRE))
    await until(lambda: sim._busy == "acquire")
    await asyncio.sleep(0.1)
    acquiring.cancel()
    await asyncio.sleep(0.1)
    assert sim._busy == "acquire"  # the render thread still runs: the instrument is not free
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    assert sim._busy is None


async def test_comms_drop_fails_stop_and_safe_state_but_hang_never_applies(
    make_sim: Callable[[float], SimulatedDualBeam],
) -> None:
    sim = make_sim(0.0)
    sim.faults.arm(FaultSpec(kind="hang", verb="any"))
    assert (await sim.stop()) == StopResult(stopped=None)  # not hung by the armed hang
    assert (await sim.safe_state()).patterning_stopped
    sim.faults.clear()
    sim.faults.arm(FaultSpec(kind="comms_drop", verb="state", duration_s=30))
    with pytest.raises(CommsLost):
        await sim.state()
    with pytest.raises(CommsLost):
        await sim.stop()
    with pytest.raises(CommsLost):
        await sim.safe_state()


# --- 3, 5, 9, 13: the server --------------------------------------------------------------------


class FakeInstrument:
    """Only what the tests below call; everything else is absent (the server never touches it)."""

    def __init__(self, stop: Callable[[], Any] | None = None) -> None:
        self._stop = stop
        self.stops = 0

    async def state(self, *, deadline_s: float | None = None) -> Any:
        raise RuntimeError("driver bug")

    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> Any:
        await asyncio.sleep(3600)

    async def stop(self, *, deadline_s: float | None = None) -> StopResult:
        self.stops += 1
        if self._stop is not None:
            await self._stop()
        return StopResult(stopped="mill")


@pytest.fixture
async def app_client() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(instrument: Any = None, token: str | None = "secret", auth: bool = True) -> httpx.AsyncClient:
        app = build_app(cast(Any, instrument or FakeInstrument()), token=token)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        headers = {"Authorization": f"Bearer {token}"} if token and auth else {}
        client = httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.aclose()


async def test_unknown_paths_methods_and_bugs_get_typed_errors(
    app_client: Callable[..., httpx.AsyncClient],
) -> None:
    http = app_client()
    missing = await http.get("/v1/nope")
    assert missing.status_code == 404 and ErrorBody.model_validate(missing.json()).kind == "invalid_request"
    method = await http.get("/v1/mill")
    assert method.status_code == 405 and method.json()["kind"] == "invalid_request"
    bug = await http.get("/v1/state")
    assert bug.status_code == 500 and bug.json()["kind"] == "instrument_fault"
    assert "RuntimeError" in bug.json()["message"]


async def test_token_checked_before_the_body_is_read(app_client: Callable[..., httpx.AsyncClient]) -> None:
    http = app_client(auth=False)
    resp = await http.post("/v1/mill", content=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status_code == 401 and resp.json()["kind"] == "unauthorized"
    assert (await http.get("/v1/openapi.json")).status_code == 200
    assert (await http.get("/healthz")).status_code == 200


async def test_malformed_json_names_the_body(app_client: Callable[..., httpx.AsyncClient]) -> None:
    http = app_client()
    resp = await http.post("/v1/mill", content=b'{"a": 1,,}', headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and resp.json()["detail"]["field"] == "body"


async def test_chunked_body_over_the_limit_is_refused(sim: SimulatorProcess) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"x_m": 0.0, "y_m": 0.0'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096
        yield b"}"

    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        resp = await http.post(
            "/v1/beam-shift", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 413 and resp.json()["detail"]["field"] == "body"
        assert (await http.get("/v1/state")).status_code == 200


@pytest.mark.parametrize("stop_behaviour", ["raises", "hangs"])
async def test_deadline_exceeded_even_if_stop_fails(
    app_client: Callable[..., httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch, stop_behaviour: str
) -> None:
    async def bad_stop() -> None:
        if stop_behaviour == "raises":
            raise CommsLost("link down")
        await asyncio.sleep(3600)

    monkeypatch.setattr(server_mod, "STOP_TIMEOUT_S", 0.2)
    instrument = FakeInstrument(stop=bad_stop)
    http = app_client(instrument)
    resp = await http.post("/v1/mill", json=SLOW_MILL.model_dump(), headers={"X-Deadline-S": "0.2"})
    assert resp.status_code == 504 and resp.json()["kind"] == "deadline_exceeded"
    assert instrument.stops == 1


# --- 5, 6, 10: the client -----------------------------------------------------------------------


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> HttpDualBeam:
    return HttpDualBeam("http://sim", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("deadline", [0.0, -1.0, math.nan, math.inf, 1e9])
async def test_bad_deadlines_are_invalid_requests(deadline: float) -> None:
    async with mock_client(lambda r: httpx.Response(200, json={})) as scope:
        with pytest.raises(InvalidRequest) as err:
            await scope.state(deadline_s=deadline)
    assert err.value.detail["field"] == "deadline_s"


async def test_malformed_tiff_and_edx_metadata_are_comms_lost() -> None:
    no_meta = encode_channels({"Ni": np.zeros((4, 4), np.float32)}, {"duration_s": 1.0})
    bodies = [no_meta, b"not a tiff", encode_channels({"Ni": np.zeros((4, 4), np.float32)}, {"step_m": None})]
    for body in bodies:

        def answer(_: httpx.Request, body: bytes = body) -> httpx.Response:
            return httpx.Response(200, content=body, headers={"Content-Type": TIFF_MEDIA_TYPE})

        async with mock_client(answer) as scope:
            with pytest.raises(CommsLost, match="malformed"):
                await scope.edx_map(EdxRequest.model_validate(EDX))


async def test_connect_timeout_and_decoding_errors_are_comms_lost() -> None:
    paths: list[str] = []

    def connect_timeout(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        raise httpx.ConnectTimeout("slow connect", request=request)

    async with mock_client(connect_timeout) as scope:
        with pytest.raises(CommsLost):
            await scope.mill(SLOW_MILL)
    assert paths == ["/v1/mill"]  # no stop attempt: the mill never reached the server

    def decoding(request: httpx.Request) -> httpx.Response:
        raise httpx.DecodingError("bad gzip", request=request)

    async with mock_client(decoding) as scope:
        with pytest.raises(CommsLost):
            await scope.state()

    async with mock_client(lambda r: httpx.Response(502, text="<html>bad gateway</html>")) as scope:
        with pytest.raises(CommsLost):
            await scope.state()


async def test_cancelled_destructive_call_stops_the_instrument(start_sim: SimStarter) -> None:
    async with (
        start_sim("--time-scale", "1", "--test-endpoints") as sim,
        HttpDualBeam(sim.url, token=sim.token) as scope,
    ):
        milling = asyncio.create_task(scope.mill(SLOW_MILL))  # ~9 s
        async with asyncio.timeout(10):
            while (await scope.state()).busy != "mill":
                await asyncio.sleep(0.02)
        t0 = time.monotonic()
        milling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await milling
        async with asyncio.timeout(5):
            while (await scope.state()).busy is not None:
                await asyncio.sleep(0.05)
        assert time.monotonic() - t0 < 4.0
        assert 0.0 < (await scope.state()).face_position_m < 60e-9


async def test_busy_over_http(start_sim: SimStarter) -> None:
    async with (
        start_sim("--time-scale", "1") as sim,
        HttpDualBeam(sim.url, token=sim.token) as scope,
    ):
        milling = asyncio.create_task(scope.mill(SLOW_MILL))
        async with asyncio.timeout(10):
            while (await scope.state()).busy != "mill":
                await asyncio.sleep(0.02)
        with pytest.raises(InstrumentBusy):
            await scope.acquire(ACQUIRE)
        await scope.stop()
        with pytest.raises(Aborted):
            await milling


# --- 4, 14, 19: processes -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_simulator_dies_with_its_parent(sim_cache: Path, tmp_path: Path) -> None:
    script = f"""
import asyncio, os, sys, time
from kintsugi_daemon.demo.simulator_process import start_simulator
from tests.support.simulator import SMALL_SIM_ARGS

async def main():
    args = (*SMALL_SIM_ARGS, "--cache-dir", {str(sim_cache)!r})
    async with start_simulator(args, ready_timeout_s=120) as sim:
        print(sim.process.pid, flush=True)
        time.sleep(600)  # block the loop: only the kill ends us

asyncio.run(main())
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_sigterm_during_mill_stops_it_first(start_sim: SimStarter) -> None:
    async with (
        start_sim("--time-scale", "1") as sim,
        HttpDualBeam(sim.url, token=sim.token) as scope,
    ):
        milling = asyncio.create_task(scope.mill(SLOW_MILL))  # ~9 s
        async with asyncio.timeout(10):
            while (await scope.state()).busy != "mill":
                await asyncio.sleep(0.02)
        t0 = time.monotonic()
        sim.process.send_signal(signal.SIGTERM)
        with pytest.raises(Aborted):  # stopped and answered, not cut off by the shutdown
            await milling
        assert time.monotonic() - t0 < 4.0
        await asyncio.wait_for(sim.process.wait(), 10)


def test_busy_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "simulator.cli",
                "serve",
                "--port",
                str(port),
                "--cache-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2 and "cannot listen" in proc.stderr
    assert "building specimen" not in proc.stderr and time.monotonic() - t0 < 20


# --- 16, 18: binding and faults -----------------------------------------------------------------


def test_check_bind_resolves_names(monkeypatch: pytest.MonkeyPatch) -> None:
    check_bind("localhost", None)
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 0))]
    )
    with pytest.raises(ValueError, match="without a token"):
        check_bind("localhost", None)


async def test_serve_refuses_a_public_socket_without_token() -> None:
    sock = listen_socket("0.0.0.0", 0)
    try:
        with pytest.raises(ValueError, match="without a token"):
            await serve(build_app(FakeInstrument(), token=None), sock)  # type: ignore[arg-type]
    finally:
        sock.close()


async def test_faults_a_verb_cannot_show_are_refused(sim: SimulatorProcess) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        for spec in ({"kind": "hang", "verb": "state"}, {"kind": "stage_move_error", "verb": "mill"}):
            resp = await http.post("/test/faults", json=spec)
            assert resp.status_code == 422 and resp.json()["detail"]["field"] == "verb", resp.text
        assert (await http.post("/test/faults", json={"kind": "hang", "verb": "mill"})).status_code == 200


def test_fault_flag_a_verb_cannot_show_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "serve", "--port", "0", "--fault", "hang@state"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "hang" in proc.stderr


# --- 12, 15: files ------------------------------------------------------------------------------


def test_atomic_writes_permissions_no_clobber_and_strict_json(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "a.json"
        write_json_atomic(target, {"x": 1})
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        with pytest.raises(FileExistsError):
            write_atomic(target, lambda fh: fh.write(b"new"), no_clobber=True)
        assert json.loads(target.read_text()) == {"x": 1}
        write_atomic(tmp_path / "b.bin", lambda fh: fh.write(b"new"), no_clobber=True)
        assert (tmp_path / "b.bin").read_bytes() == b"new"
        with pytest.raises(ValueError, match="JSON"):
            write_json_atomic(tmp_path / "nan.json", {"x": math.nan})
        assert not (tmp_path / "nan.json").exists()
        assert not list(tmp_path.glob(".*.tmp"))
    finally:
        os.umask(old)


def test_reexport_removes_a_stale_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import simulator.dataset as dataset_mod

    stale = tmp_path / "with-pt" / "dataset.json"
    stale.parent.mkdir()
    stale.write_text("{}")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("interrupted export")

    monkeypatch.setattr(dataset_mod, "make_simulator", boom)
    with pytest.raises(RuntimeError):
        dataset_mod.export_dataset(tmp_path, slices=1)
    assert not stale.exists()  # an incomplete folder no longer claims to be complete


def test_error_classes_are_instrument_errors() -> None:
    assert issubclass(InstrumentBusy, InstrumentError) and InstrumentBusy.kind == "busy"
    assert issubclass(Unauthorized, InstrumentError) and not issubclass(Unauthorized, CommsLost)
    assert issubclass(DeadlineExceeded, InstrumentError)
