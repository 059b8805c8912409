"""Stop, deadlines and injected faults, against a real simulator process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest

from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.drivers.base import (
    Aborted,
    CommsLost,
    DeadlineExceeded,
    DepositRequest,
    InstrumentFault,
    IonBeamSettings,
    MillRequest,
    Rectangle,
    StageMove,
)
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.drivers.server import check_bind
from simulator.faults import FaultPlan, FaultSpec, parse_fault_flag
from tests.support.simulator import SimStarter

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=12e-6, height_m=10e-6)
# At 1 nA a 40 nm slice of 12 x 10 um takes ~9 s of instrument time: long enough to stop midway.
SLOW_MILL = MillRequest(pattern="rectangle", area=AREA, slice_thickness_m=40e-9, current_a=1e-9, species="xe")


async def inject(sim: SimulatorProcess, spec: dict[str, object]) -> None:
    async with httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {sim.token}"}) as http:
        resp = await http.post("/test/faults", json=spec)
        resp.raise_for_status()


async def face(sim: SimulatorProcess) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=sim.url, headers={"Authorization": f"Bearer {sim.token}"}) as http:
        resp = await http.get("/test/face")
        resp.raise_for_status()
        result: dict[str, object] = resp.json()
        return result


async def wait_until_busy(scope: HttpDualBeam, verb: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while (await scope.state()).busy != verb:
            await asyncio.sleep(0.02)


async def test_stop_during_mill_leaves_face_consistent(start_sim: SimStarter) -> None:
    async with (
        start_sim("--time-scale", "1", "--test-endpoints") as sim,
        HttpDualBeam(sim.url, token=sim.token) as scope,
    ):
        milling = asyncio.create_task(scope.mill(SLOW_MILL))
        await wait_until_busy(scope, "mill")
        stopped = await scope.stop()
        assert stopped.stopped == "mill"
        with pytest.raises(Aborted) as err:
            await milling
        removed = float(err.value.detail["removed_m"])
        assert 0.0 <= removed < 60e-9
        state = await scope.state()
        assert state.busy is None and state.patterning == "idle"
        assert state.face_position_m == pytest.approx(removed)  # the face moved by what was milled, no more
        assert (await face(sim))["slice_index"] == 0  # an unfinished slice is not counted


async def test_hang_past_deadline_is_stopped(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "hang", "verb": "mill"})
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await scope.mill(SLOW_MILL, deadline_s=1.0)
    assert time.monotonic() - t0 < 8.0
    state = await scope.state()
    assert state.busy is None  # the server stopped the hung operation
    result = await scope.mill(SLOW_MILL)  # and the instrument works again
    assert result.completed


async def test_vacuum_loss_faults_then_recovers(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "vacuum_loss", "duration_s": 1.5})
    with pytest.raises(InstrumentFault, match="vacuum"):
        await scope.mill(SLOW_MILL)
    assert (await scope.state()).vacuum == "fault"
    async with asyncio.timeout(10):
        while (await scope.state()).vacuum != "pumped":
            await asyncio.sleep(0.1)
    assert (await scope.mill(SLOW_MILL)).completed


async def test_gis_heater_failure(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "gis_heater_failure"})
    with pytest.raises(InstrumentFault, match="GIS heater") as err:
        await scope.deposit_pt(DepositRequest(area=AREA, thickness_m=1e-7, beam="electron"))
    assert err.value.detail["gis_temperature_k"] < 300
    state = await scope.state()
    assert not state.gis.inserted  # retracted after the failure
    assert (await face(sim))["pt_voxels_ahead"] == 0  # no Pt went anywhere


async def test_stage_move_error_and_current_drop(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "stage_move_error", "verb": "move_stage"})
    with pytest.raises(InstrumentFault, match="stage"):
        await scope.move_stage(StageMove(mode="relative", x_m=1e-6))
    assert (await scope.move_stage(StageMove(mode="relative", x_m=1e-6))).x_m == pytest.approx(1e-6)

    await scope.set_ion_beam(IonBeamSettings(species="xe", current_a=15e-9, voltage_v=30000.0))
    await inject(sim, {"kind": "beam_current_drop"})
    state = await scope.state()
    assert state.ion.current_a == pytest.approx(0.6 * 15e-9)


async def test_comms_drop_then_back(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "comms_drop", "duration_s": 1.0})
    with pytest.raises(CommsLost):
        await scope.state()
    async with asyncio.timeout(10):
        while True:
            try:
                await scope.state()
                break
            except CommsLost:
                await asyncio.sleep(0.1)


async def test_crash_drops_the_connection(scope: HttpDualBeam, sim: SimulatorProcess) -> None:
    await inject(sim, {"kind": "crash", "verb": "mill"})
    with pytest.raises(CommsLost):
        await scope.mill(SLOW_MILL)
    assert await asyncio.wait_for(sim.process.wait(), 10) == 70


async def test_fault_flag_arms_at_start(start_sim: SimStarter) -> None:
    async with (
        start_sim("--time-scale", "0", "--fault", "stage_move_error@move_stage:1") as sim,
        HttpDualBeam(sim.url, token=sim.token) as scope,
    ):
        await scope.move_stage(StageMove(mode="relative", x_m=1e-6))  # the first one passes
        with pytest.raises(InstrumentFault):
            await scope.move_stage(StageMove(mode="relative", x_m=1e-6))


def test_fault_flags_parse_and_reject() -> None:
    spec = parse_fault_flag("hang@mill:3/2.5")
    assert spec == FaultSpec(kind="hang", verb="mill", after_calls=3, duration_s=2.5)
    for bad in ("meltdown", "hang@dance", "hang:-1", ""):
        with pytest.raises(ValueError):  # noqa: PT011 (pydantic and our parser both raise ValueError)
            parse_fault_flag(bad)


def test_fault_plan_counts_calls_per_verb() -> None:
    plan = FaultPlan()
    plan.arm(FaultSpec(kind="hang", verb="mill", after_calls=1))
    assert plan.tick("acquire", 0.0) == []
    assert plan.tick("mill", 0.0) == []
    assert [f.kind for f in plan.tick("mill", 0.0)] == ["hang"]
    assert plan.tick("mill", 0.0) == []  # one-shot


def test_refuses_to_bind_beyond_loopback_without_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ValueError, match="without a token"):
        check_bind("0.0.0.0", None)
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "without a token" in proc.stderr
