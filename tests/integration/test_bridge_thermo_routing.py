"""The thermo backend's wiring: `BridgeDualBeam` with AutoScript's direct verbs sends imaging, patterning,
deposition, the ion column, the beam shift, stigmation and the safe state to AutoScript (the recording
fake), and everything else to OpenFIBSEM (here its real DemoMicroscope, standing in for ThermoMicroscope).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kintsugi_daemon.drivers.base import (
    AcquireRequest,
    AutoFunctionRequest,
    BeamShift,
    DepositRequest,
    DetectorSettings,
    IonBeamSettings,
    MillRequest,
    Rectangle,
    StageMove,
)
from kintsugi_daemon.drivers.bridge.autoscript import AutoScriptVerbs
from kintsugi_daemon.drivers.bridge.backends import open_backend
from kintsugi_daemon.drivers.bridge.dualbeam import APPLICATION_FILES, BridgeDualBeam
from tests.support.autoscript_fake import FakeAutoScript, FakePoint, FakeStructures, RecordingLock

pytest.importorskip(
    "fibsem", reason="OpenFIBSEM (the [bridge] extra) is not installed: pip install -e '.[dev,bridge]'"
)

AREA = Rectangle(center_x_m=0.0, center_y_m=0.0, width_m=20e-6, height_m=10e-6)


def fake_thermo() -> FakeAutoScript:
    limits = SimpleNamespace(min=-5e-6, max=5e-6)
    fake = FakeAutoScript(
        RecordingLock(),
        values={
            "beams.ion_beam.source.plasma_gas.value": "Xenon",
            "beams.ion_beam.source.plasma_gas.available_values": ["Xenon", "Oxygen"],
            "beams.ion_beam.beam_current.value": 1e-9,
            "beams.ion_beam.high_voltage.value": 30e3,
            "beams.electron_beam.beam_shift.limits": SimpleNamespace(limits_x=limits, limits_y=limits),
            "detector.brightness.value": 0.5,
            "detector.contrast.value": 0.5,
        },
    )
    running = [0]  # each started pattern reads Running once, then Idle

    def on_call(path: str) -> None:
        if path == "patterning.start":
            running[0] = 1

    def state() -> str:
        if running[0]:
            running[0] -= 1
            return "Running"
        return "Idle"

    fake.on_call = on_call
    fake.values["patterning.state"] = state
    fake.returns["patterning.list_all_application_files"] = sorted(set(APPLICATION_FILES.values()))
    pattern = SimpleNamespace(width=1.0, height=1.0)
    for kind in ("create_rectangle", "create_cleaning_cross_section"):
        fake.returns[f"patterning.{kind}"] = lambda **_: pattern
    fake.returns["imaging.grab_multiple_frames"] = lambda settings: [
        SimpleNamespace(data=np.full((96, 128), 1000 * (i + 1), np.uint16))
        for i in range(len(settings["GrabFrameSettings"]["views"]))
    ]
    return fake


def paths(fake: FakeAutoScript) -> list[str]:
    return [c.path for c in fake.calls]


async def test_thermo_verbs_go_to_autoscript_and_the_rest_to_openfibsem(tmp_path: Path) -> None:
    demo: Any = open_backend("demo", microscope_host=None, log_dir=tmp_path).m
    fake = fake_thermo()
    verbs = AutoScriptVerbs(fake.client, fake.lock, FakeStructures(), poll_s=0.001, start_grace_s=0.05)
    beam = BridgeDualBeam(
        demo, backend="thermo", direct=verbs, state_file=tmp_path / "s.json", gis_warmup_s=0
    )
    beam.check_application_files()
    assert paths(fake) == ["patterning.list_all_application_files"]

    fake.calls.clear()
    moved = await beam.move_stage(StageMove(mode="absolute", x_m=1e-3))  # OpenFIBSEM's verb
    assert moved.x_m == pytest.approx(1e-3)
    ion = await beam.set_ion_beam(IonBeamSettings(species="o", current_a=60e-9, voltage_v=30e3))
    assert ion.species == "o" and ion.current_a == pytest.approx(60e-9)
    shift = await beam.set_beam_shift(BeamShift(x_m=1e-6, y_m=2e-6))
    assert (shift.x_m, shift.y_m) == (1e-6, 2e-6)
    assert fake.sequence() == [
        ("beams.ion_beam.source.plasma_gas.value =", "Oxygen"),
        ("beams.ion_beam.high_voltage.value =", 30e3),
        ("beams.ion_beam.beam_current.value =", 60e-9),
        ("beams.electron_beam.beam_shift.value =", FakePoint(1e-6, 2e-6)),
    ]

    fake.calls.clear()
    deposit = await beam.deposit_pt(DepositRequest(area=AREA, thickness_m=100e-9, beam="electron"))
    assert deposit.cap_thickness_m == pytest.approx(100e-9)
    assert ("patterning.set_default_application_file", "Pt dep") in fake.sequence()
    assert paths(fake)[-1] == "gas.get_gis_port.retract"

    fake.calls.clear()
    mill = MillRequest(
        pattern="cleaning_cross_section", area=AREA, slice_thickness_m=40e-9, current_a=15e-9, species="o"
    )
    milled = await beam.mill(mill)
    assert milled.face_position_m == pytest.approx(40e-9)
    seq = fake.sequence()
    assert ("patterning.set_default_application_file", "Si-ccs") in seq
    assert ("beams.ion_beam.beam_current.value =", 15e-9) in seq
    assert seq.index(("patterning.start",)) > seq.index(("beams.ion_beam.beam_current.value =", 15e-9))

    fake.calls.clear()
    request = AcquireRequest(
        detectors=[DetectorSettings(name="cbs"), DetectorSettings(name="tld")],
        width_px=128,
        height_px=96,
        pixel_size_m=40e-9,
        dwell_s=3e-6,
        voltage_v=5e3,
        current_a=5e-9,
    )
    acq = await beam.acquire(request)
    assert paths(fake).count("imaging.grab_multiple_frames") == 1  # one scan for both detectors
    assert int(acq.images["cbs"][0, 0]) == 1000 and int(acq.images["tld"][0, 0]) == 2000
    assert acq.metadata.face_position_m == pytest.approx(40e-9) and acq.metadata.slice_index == 1

    fake.calls.clear()
    await beam.auto_function(AutoFunctionRequest(function="stigmation"))
    assert "auto_functions.run_auto_stigmator" in paths(fake)
    state = await beam.state()
    assert state.ion.species == "o" and state.beam_shift_limit_m == pytest.approx(5e-6)
    safe = await beam.safe_state()
    assert safe.beams_blanked and paths(fake)[-2:] == ["gas.get_gis_port.close", "gas.get_gis_port.retract"]
