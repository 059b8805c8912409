"""The bridge's direct AutoScript calls, against a recording fake of the AutoScript surface.

Each test asserts the exact call sequence a verb sends, and DOMAIN.md's traps: set-view-then-act pairs
under one lock, the beam shift as one whole Point, zero-size patterns retried, application files checked
at start, and a stop that really stops patterning (also when it lands before the pattern starts).
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from kintsugi_daemon.drivers.base import Aborted, InstrumentFault, InvalidRequest
from kintsugi_daemon.drivers.bridge.autoscript import AutoScriptVerbs, DetectorSetup, PatternJob
from tests.support.autoscript_fake import (
    FakeAutoScript,
    FakePattern,
    FakePoint,
    FakeStructures,
    RecordingLock,
)

JOB = PatternJob(
    kind="cleaning_cross_section",
    center_x_m=1e-6,
    center_y_m=-2e-6,
    width_m=40e-6,
    height_m=10e-6,
    depth_m=40e-9,
    application_file="Si-ccs",
    current_a=15e-9,
)


def make(**values: Any) -> tuple[FakeAutoScript, AutoScriptVerbs]:
    fake = FakeAutoScript(RecordingLock(), values=dict(values))
    verbs = AutoScriptVerbs(fake.client, fake.lock, FakeStructures(), poll_s=0.001, start_grace_s=0.05)
    return fake, verbs


def states(*sequence: str) -> Any:
    """patterning.state answers: the given ones in order, then the last one for ever."""
    it = iter(sequence)
    last = [sequence[-1]]

    def read() -> str:
        last[0] = next(it, last[0])
        return last[0]

    return read


def good_pattern(**_: Any) -> FakePattern:
    return FakePattern(width=40e-6, height=10e-6)


PATTERN_SETUP = [
    ("imaging.set_active_view", 2),
    ("imaging.set_active_device", 2),
    ("patterning.clear_patterns",),
    ("patterning.set_default_beam_type", 2),
    ("patterning.set_default_application_file", "Si-ccs"),
    ("beams.ion_beam.beam_current.value =", 15e-9),
    (
        "patterning.create_cleaning_cross_section",
        "center_x=1e-06",
        "center_y=-2e-06",
        "width=4e-05",
        "height=1e-05",
        "depth=4e-08",
    ),
]


def test_multi_detector_grab_is_one_scan_with_every_view_set_under_the_lock() -> None:
    fake, verbs = make()
    frames = [SimpleNamespace(data=np.full((4, 6), v, np.uint16)) for v in (100, 200)]
    fake.returns["imaging.grab_multiple_frames"] = frames
    images = verbs.grab(
        [DetectorSetup("cbs", "backscatter"), DetectorSetup("tld", brightness=0.4, contrast=0.6)],
        width_px=1536,
        height_px=1024,
        pixel_size_m=40e-9,
        dwell_s=3e-6,
        line_integration=2,
        voltage_v=5000.0,
        current_a=5e-9,
    )
    assert fake.sequence() == [
        ("beams.electron_beam.high_voltage.value =", 5000.0),
        ("beams.electron_beam.beam_current.value =", 5e-9),
        ("beams.electron_beam.horizontal_field_width.value =", 1536 * 40e-9),
        ("imaging.set_active_view", 1),
        ("imaging.set_active_device", 1),
        ("detector.type.value =", "CBS"),
        ("detector.mode.value =", "BackscatterElectrons"),
        ("imaging.set_active_view", 2),
        ("imaging.set_active_device", 1),
        ("detector.type.value =", "TLD"),
        ("detector.brightness.value =", 0.4),
        ("detector.contrast.value =", 0.6),
        (
            "imaging.grab_multiple_frames",
            {
                "GrabFrameSettings": {
                    "resolution": "1536x1024",
                    "dwell_time": 3e-6,
                    "bit_depth": 16,
                    "line_integration": 2,
                    "views": [1, 2],
                }
            },
        ),
    ]
    assert all(c.locked for c in fake.calls), [c.path for c in fake.calls if not c.locked]
    assert images["cbs"].dtype == np.uint16 and int(images["tld"][0, 0]) == 200


def test_a_mill_sets_up_under_the_lock_starts_and_waits_for_idle() -> None:
    fake, verbs = make(**{"patterning.state": states("Idle", "Running", "Running", "Idle")})
    fake.returns["patterning.create_cleaning_cross_section"] = good_pattern
    verbs.run_pattern(JOB)
    setup_and_start = [*PATTERN_SETUP, ("patterning.start",)]
    assert fake.sequence()[: len(setup_and_start)] == setup_and_start
    assert all(c.locked for c in fake.calls[: len(setup_and_start)])
    # Polling reads the state with the ion view set; at the end the patterns are cleared.
    assert fake.sequence()[len(setup_and_start) :] == [("imaging.set_active_view", 2)] * 4 + [
        ("imaging.set_active_view", 2),
        ("patterning.clear_patterns",),
    ]
    assert ("patterning.stop",) not in fake.sequence()


def test_a_zero_size_pattern_is_retried() -> None:
    fake, verbs = make(**{"patterning.state": states("Running", "Idle")})
    answers = iter([FakePattern(0.0, 0.0), FakePattern(40e-6, 10e-6)])
    fake.returns["patterning.create_cleaning_cross_section"] = lambda **_: next(answers)
    verbs.run_pattern(JOB)
    seq = fake.sequence()
    creates = [i for i, c in enumerate(seq) if c[0] == "patterning.create_cleaning_cross_section"]
    assert len(creates) == 2
    assert seq[creates[0] + 1] == ("patterning.clear_patterns",)  # the empty one is thrown away
    assert seq.index(("patterning.start",)) > creates[1]


def test_a_pattern_that_stays_zero_size_is_a_fault_and_nothing_starts() -> None:
    fake, verbs = make()
    fake.returns["patterning.create_cleaning_cross_section"] = lambda **_: FakePattern(0.0, 10e-6)
    with pytest.raises(InstrumentFault, match="zero-size"):
        verbs.run_pattern(JOB)
    assert ("patterning.start",) not in fake.sequence()
    assert sum(c[0] == "patterning.create_cleaning_cross_section" for c in fake.sequence()) == 3


def test_stop_stops_a_running_pattern() -> None:
    fake, verbs = make(**{"patterning.state": states("Running")})
    fake.returns["patterning.create_cleaning_cross_section"] = good_pattern
    started = threading.Event()
    fake.on_call = lambda path: started.set() if path == "patterning.start" else None
    outcome: list[BaseException] = []

    def mill() -> None:
        try:
            verbs.run_pattern(JOB)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=mill)
    worker.start()
    assert started.wait(5.0)
    assert verbs.stop_patterning() is True
    worker.join(5.0)
    assert not worker.is_alive(), "the mill did not end after stop"
    assert len(outcome) == 1 and isinstance(outcome[0], Aborted)
    stop = fake.sequence().index(("patterning.stop",))
    assert fake.calls[stop].locked
    assert fake.sequence()[stop:][-1] == ("patterning.clear_patterns",)


def test_a_stop_before_the_start_means_the_pattern_never_starts() -> None:
    fake, verbs = make(**{"patterning.state": states("Idle")})
    fake.returns["patterning.create_cleaning_cross_section"] = good_pattern
    assert verbs.stop_patterning() is False  # nothing of ours was running: no patterning.stop sent
    with pytest.raises(Aborted):
        verbs.run_pattern(JOB)
    assert ("patterning.start",) not in fake.sequence()
    assert ("patterning.stop",) not in fake.sequence()


def test_a_stop_during_setup_waits_for_the_start_and_then_stops_it() -> None:
    fake, verbs = make(**{"patterning.state": states("Running")})
    fake.returns["patterning.create_cleaning_cross_section"] = good_pattern
    stopper = threading.Thread(target=verbs.stop_patterning)

    def on_call(path: str) -> None:
        if path == "patterning.create_cleaning_cross_section":
            stopper.start()  # the operator's stop arrives while the setup holds the lock

    fake.on_call = on_call
    with pytest.raises(Aborted):
        verbs.run_pattern(JOB)
    stopper.join(5.0)
    seq = fake.sequence()
    assert seq.index(("patterning.start",)) < seq.index(("patterning.stop",))


def test_pt_deposition_drives_the_gis_around_the_pattern() -> None:
    fake, verbs = make(**{"patterning.state": states("Running", "Idle")})
    fake.returns["patterning.create_rectangle"] = good_pattern
    job = PatternJob("rectangle", 0.0, 0.0, 40e-6, 10e-6, 100e-9, "Pt dep", beam="electron")
    verbs.deposit_pt(job, warmup_s=0.0)
    seq = fake.sequence(skip=("imaging.",))
    assert seq[:3] == [
        ("gas.get_gis_port", "Pt dep"),
        ("gas.get_gis_port.insert",),
        ("gas.get_gis_port.turn_heater_on",),
    ]
    assert seq[3:8] == [
        ("patterning.clear_patterns",),
        ("patterning.set_default_beam_type", 1),
        ("patterning.set_default_application_file", "Pt dep"),
        (
            "patterning.create_rectangle",
            "center_x=0.0",
            "center_y=0.0",
            "width=4e-05",
            "height=1e-05",
            "depth=1e-07",
        ),
        ("gas.get_gis_port.open",),
    ]
    assert seq[8] == ("patterning.start",)
    assert seq[-4:] == [
        ("patterning.clear_patterns",),
        ("gas.get_gis_port.close",),
        ("gas.get_gis_port.turn_heater_off",),
        ("gas.get_gis_port.retract",),
    ]


def test_a_failed_deposition_still_closes_and_retracts_the_gis() -> None:
    fake, verbs = make()

    def broken(**_: Any) -> FakePattern:
        raise RuntimeError("patterning server gone")

    fake.returns["patterning.create_rectangle"] = broken
    job = PatternJob("rectangle", 0.0, 0.0, 40e-6, 10e-6, 100e-9, "Pt dep", beam="electron")
    with pytest.raises(RuntimeError, match="gone"):
        verbs.deposit_pt(job, warmup_s=0.0)
    seq = fake.sequence(skip=("imaging.", "patterning."))
    assert seq[-3:] == [
        ("gas.get_gis_port.close",),
        ("gas.get_gis_port.turn_heater_off",),
        ("gas.get_gis_port.retract",),
    ]
    assert ("gas.get_gis_port.open",) not in seq


def test_the_beam_shift_is_written_as_one_whole_point() -> None:
    fake, verbs = make()
    assert verbs.set_beam_shift(1e-6, -2e-6) == (1e-6, -2e-6)
    assert fake.sequence() == [("beams.electron_beam.beam_shift.value =", FakePoint(1e-6, -2e-6))]


def test_plasma_gas_switch_then_voltage_and_current() -> None:
    fake, verbs = make(
        **{
            "beams.ion_beam.source.plasma_gas.value": "Xenon",
            "beams.ion_beam.source.plasma_gas.available_values": ["Xenon", "Oxygen", "Argon"],
        }
    )
    verbs.set_ion_beam("o", 30_000.0, 60e-9)
    assert fake.sequence() == [
        ("beams.ion_beam.source.plasma_gas.value =", "Oxygen"),
        ("beams.ion_beam.high_voltage.value =", 30_000.0),
        ("beams.ion_beam.beam_current.value =", 60e-9),
    ]
    fake.calls.clear()
    verbs.set_ion_beam("o", 30_000.0, 1e-9)  # already oxygen: no switch (minutes saved)
    assert fake.sequence()[0] == ("beams.ion_beam.high_voltage.value =", 30_000.0)
    fake.calls.clear()
    with pytest.raises(InvalidRequest, match="Nitrogen"):
        verbs.set_ion_beam("n", 30_000.0, 1e-9)
    assert fake.calls == []


def test_missing_application_files_are_refused_at_start_by_name() -> None:
    fake, verbs = make()
    fake.returns["patterning.list_all_application_files"] = ["Si", "Si-ccs"]
    verbs.check_application_files(["Si", "Si-ccs"])
    with pytest.raises(ValueError, match=r"\['Pt dep'\]"):
        verbs.check_application_files(["Si", "Pt dep"])


def test_safe_state_stops_blanks_and_retracts() -> None:
    fake, verbs = make()
    assert verbs.safe_state() == (True, True, True)
    assert fake.sequence() == [
        ("beams.electron_beam.blank",),
        ("beams.ion_beam.blank",),
        ("gas.get_gis_port", "Pt dep"),
        ("gas.get_gis_port.close",),
        ("gas.get_gis_port.retract",),
    ]
