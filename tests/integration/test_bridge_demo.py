"""`kintsugi bridge --backend demo` as a real process over OpenFIBSEM's DemoMicroscope: third-party code on
the other side of the instrument API. Every verb round-trips through the daemon's own client; a stop
really stops a mill; a whole demo run (Mosquitto, the daemon, the bridge) completes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kintsugi_daemon.demo.bridge_process import start_bridge
from kintsugi_daemon.drivers.base import (
    Aborted,
    AcquireRequest,
    AutoFunctionRequest,
    BeamShift,
    DepositRequest,
    DetectorSettings,
    EdxRequest,
    InvalidRequest,
    IonBeamSettings,
    MillRequest,
    PolishRequest,
    Rectangle,
    StageMove,
    Unauthorized,
    Unsupported,
)
from kintsugi_daemon.drivers.http_client import HttpDualBeam

pytest.importorskip(
    "fibsem", reason="OpenFIBSEM (the [bridge] extra) is not installed: pip install -e '.[dev,bridge]'"
)

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=20e-6, height_m=10e-6)
MILL = MillRequest(
    pattern="cleaning_cross_section", area=AREA, slice_thickness_m=40e-9, current_a=15e-9, species="xe"
)


def acquire(*detectors: str) -> AcquireRequest:
    return AcquireRequest(
        detectors=[DetectorSettings(name=d) for d in detectors],  # type: ignore[arg-type]
        width_px=128,
        height_px=96,
        pixel_size_m=40e-9,
        dwell_s=1e-6,
        voltage_v=5000.0,
        current_a=5e-9,
    )


async def test_every_verb_round_trips_through_the_bridge(tmp_path: Path) -> None:
    async with (
        start_bridge("demo", tmp_path, log_path=tmp_path / "bridge.log") as bridge,
        HttpDualBeam(bridge.url, token=bridge.token) as scope,
    ):
        identity = await scope.identity()
        assert identity.model == "DemoMicroscope" and identity.simulated
        before = await scope.state()
        assert before.vacuum == "pumped" and before.ion.species == "xe" and before.busy is None

        # Stage: explicit axes only; an axis left out is left where it was.
        moved = await scope.move_stage(StageMove(mode="absolute", y_m=2e-4, tilt_deg=-38.0))
        assert moved.y_m == pytest.approx(2e-4) and moved.tilt_deg == pytest.approx(-38.0)
        moved = await scope.move_stage(StageMove(mode="absolute", x_m=1e-3))
        assert moved.x_m == pytest.approx(1e-3) and moved.y_m == pytest.approx(2e-4)
        assert moved.tilt_deg == pytest.approx(-38.0)
        moved = await scope.move_stage(StageMove(mode="relative", y_m=-1e-4))
        assert moved.y_m == pytest.approx(1e-4) and moved.x_m == pytest.approx(1e-3)

        ion = await scope.set_ion_beam(IonBeamSettings(species="o", current_a=60e-9, voltage_v=30_000.0))
        assert ion.species == "o" and ion.current_a == pytest.approx(60e-9)
        shift = await scope.set_beam_shift(BeamShift(x_m=1e-6, y_m=-2e-6))
        assert (shift.x_m, shift.y_m) == (1e-6, -2e-6)

        deposited = await scope.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
        assert deposited.cap_thickness_m == pytest.approx(100e-9)
        milled = await scope.mill(MILL)
        assert milled.completed and milled.face_position_m == pytest.approx(40e-9)
        polished = await scope.polish(PolishRequest(area=AREA, current_a=1e-9, species="xe", passes=2))
        assert polished.face_position_m == pytest.approx(50e-9)
        state = await scope.state()
        assert state.face_position_m == pytest.approx(50e-9) and state.pt_cap_thickness_m == pytest.approx(
            1e-7
        )
        assert state.ion_current_setpoint_a == pytest.approx(1e-9)  # the polish current is the guard's band

        # One detector at a time on the Demo, returned as one acquisition of 16-bit frames.
        acq = await scope.acquire(acquire("tld", "etd"))
        assert set(acq.images) == {"tld", "etd"}
        assert all(img.dtype == np.uint16 and img.shape == (96, 128) for img in acq.images.values())
        assert acq.images["tld"].std() > 0  # the Demo's noise, really transferred
        assert acq.metadata.face_position_m == pytest.approx(50e-9) and acq.metadata.slice_index == 1
        assert acq.metadata.beam_shift == BeamShift(x_m=1e-6, y_m=-2e-6)
        with pytest.raises(InvalidRequest, match="cbs") as refused:
            await scope.acquire(acquire("cbs"))  # the Demo has no CBS
        assert refused.value.detail.get("field") == "detectors"

        focus = await scope.auto_function(AutoFunctionRequest(function="focus"))
        assert focus.working_distance_m > 0
        await scope.auto_function(AutoFunctionRequest(function="contrast_brightness"))
        with pytest.raises(Unsupported):
            await scope.auto_function(AutoFunctionRequest(function="stigmation"))
        with pytest.raises(Unsupported, match="EDX"):
            await scope.edx_map(
                EdxRequest(
                    elements=["Ni"],
                    voltage_v=10e3,
                    current_a=1.6e-9,
                    step_m=54e-9,
                    dwell_s=1e-4,
                    width_m=5e-6,
                    height_m=5e-6,
                )
            )
        assert (await scope.stop()).stopped is None
        safe = await scope.safe_state()
        assert safe.patterning_stopped and safe.beams_blanked
        after = await scope.state()
        assert not after.electron_beam_on and not after.ion_beam_on
        assert after.instrument_time_s > 0

    # A restarted bridge remembers the face and the cap (the daemon reconciles against them).
    async with start_bridge("demo", tmp_path) as again, HttpDualBeam(again.url, token=again.token) as scope:
        state = await scope.state()
        assert state.face_position_m == pytest.approx(50e-9) and state.pt_cap_thickness_m == pytest.approx(
            1e-7
        )
        async with HttpDualBeam(again.url, token="not-the-token") as anonymous:
            with pytest.raises(Unauthorized):
                await anonymous.state()


async def test_stop_really_stops_a_mill(tmp_path: Path) -> None:
    # With the Demo's delays on, a pattern takes 5 s: long enough to stop it in the middle.
    async with (
        start_bridge("demo", tmp_path, delays=True) as bridge,
        HttpDualBeam(bridge.url, token=bridge.token) as scope,
    ):
        mill = asyncio.create_task(scope.mill(MILL))
        async with asyncio.timeout(10.0):
            while (await scope.state()).patterning != "running":
                await asyncio.sleep(0.05)
        t0 = asyncio.get_running_loop().time()
        assert (await scope.stop()).stopped == "mill"
        with pytest.raises(Aborted):
            await asyncio.wait_for(mill, 5.0)
        assert asyncio.get_running_loop().time() - t0 < 3.0  # not the 5 s the pattern would take
        state = await scope.state()
        assert state.patterning == "idle" and state.busy is None
        assert state.face_position_m == 0.0  # a stopped mill is not counted as a slice


def test_a_demo_run_through_the_bridge_completes(tmp_path: Path) -> None:
    """The whole chain as real processes: Mosquitto, `kintsugi serve`, `kintsugi bridge --backend demo`."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "kintsugi_daemon.cli", "demo", "--bridge", "demo", "--slices", "3"),
            *("--width-px", "128", "--height-px", "96", "--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(done)" in result.stdout and "3 of 3 requested" in result.stdout, result.stdout
    assert "bridge ready" in result.stderr
    (demo_dir,) = tmp_path.iterdir()
    (run_dir,) = [p for p in (demo_dir / "runs").iterdir() if p.is_dir()]
    tiffs = sorted(run_dir.rglob("*.tif"))
    assert len(tiffs) == 6  # 3 slices x (TLD, ETD)
    for path in tiffs:
        image = tifffile.imread(path)
        assert image.dtype == np.uint16 and image.shape == (96, 128)
    # The daemon's mills went through OpenFIBSEM: the bridge counted them from the patterns it completed.
    book = json.loads((demo_dir / "bridge" / "bridge-state.json").read_text())
    assert book["slices"] == 3 and book["pt_cap_thickness_m"] == pytest.approx(3 * 100e-9)


def test_a_missing_application_file_stops_the_bridge_at_start_by_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "kintsugi_daemon.cli", "bridge", "--backend", "demo", "--port", "0"),
            *("--log-dir", str(tmp_path), "--application-file", "deposit=Pt dep (site)"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "['Pt dep (site)']" in result.stderr and "--application-file" in result.stderr
    assert '"event": "ready"' not in result.stdout
