"""The adaptive policy end to end: the daemon's controller against a real simulator process (test
endpoints on) with segmentation by the shipped model. Drift injected into the instrument is measured on
the fiducial and corrected by beam shift (checked against the simulator's ground truth); a lost fiducial
and a policy that raises suspend the run with an alert, and nothing is milled after."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tifffile

from kintsugi_daemon import adapt
from kintsugi_daemon.adapt.decisions import Decision
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.inference.contract import OUTSIDE_LABEL
from kintsugi_daemon.instrument import SIN_SEM_FIB
from kintsugi_daemon.states import adapting, recovery
from tests.integration.test_controller import Harness, make_harness
from tests.support.simulator import auth

PX = 40e-9
RECIPE = """
[run]
name = "adaptive"
slices = 7
slice_thickness_m = 40e-9
[roi]
width_m = 10e-6
height_m = 8e-6
[imaging]
width_px = 256
height_px = 192
[segmentation]
enabled = true
[adapt]
policy = "adaptive"
[adapt.drift]
fiducial_x_px = 8
fiducial_y_px = 8
fiducial_width_px = 128
fiducial_height_px = 64
[guards]
min_free_disk_bytes = 0
settle_s = 0.2
poll_s = 0.1
"""


@pytest.fixture
async def harness(sim: SimulatorProcess, tmp_path: Path) -> AsyncIterator[Harness]:
    h, client = await make_harness(sim, tmp_path)
    yield h
    await h.controller.close()
    await client.aclose()
    h.journal.close()


async def sim_call(sim: SimulatorProcess, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with httpx.AsyncClient(base_url=sim.url, headers=auth(sim)) as http:
        reply = await http.request(method, f"/test/{path}", json=body)
        reply.raise_for_status()
        return reply.json()


def decisions(h: Harness) -> list[Decision]:
    run_id = h.journal.runs()[-1].run_id
    out: list[Decision] = []
    for rec in h.journal.steps(run_id):
        if rec.step == "adapt" and rec.ok and rec.result:
            out += [Decision.model_validate(d) for d in rec.result["decisions"]]
    return out


async def test_injected_drift_is_measured_and_corrected(harness: Harness, sim: SimulatorProcess) -> None:
    dx_px = 8.0

    async def knock(n: int) -> None:
        if n == 3:  # before the third image: the specimen jumps 8 px across
            await sim_call(sim, "POST", "drift", {"dx_m": -dx_px * PX, "dy_m": 0.0})

    harness.recorder.hooks["acquire"] = knock
    await harness.controller.command("start", {"recipe": RECIPE})
    await harness.wait_state("done", limit_s=240)
    commands = harness.recorder.commands()
    assert commands[0] == "mill_fiducial" and commands[1] == "deposit_pt"
    truth = await sim_call(sim, "GET", "truth")
    ref = truth[0]
    residual = [
        (
            (t["fov_error_x_m"] - ref["fov_error_x_m"]) / PX,
            (t["fov_error_y_m"] - ref["fov_error_y_m"]) / (PX / SIN_SEM_FIB),
        )
        for t in truth
    ]
    assert abs(residual[2][0]) > dx_px - 1  # the knock shows in the third image
    assert all(abs(x) < 1.5 and abs(y) < 1.5 for x, y in residual[3:]), residual  # corrected from the next
    shifts = [d for d in decisions(harness) if d.policy == "drift" and d.action == "beam_shift"]
    knock_decision = next(d for d in shifts if d.basis_slice == 2)
    assert knock_decision.applies_to_slice == 3 and knock_decision.measured["shift_x_px"] == pytest.approx(
        dx_px, abs=1.0
    )  # the field moved by -drift: the content the other way; the registration shift undoes it
    # Every decision is in the slice's adapt record and on the journal's `adapted` events.
    run_dir = harness.settings.data_root / harness.journal.runs()[-1].run_id
    record = json.loads((run_dir / "slices" / "0002.adapt.json").read_text())
    assert any(d["policy"] == "drift" for d in record["decisions"])
    adapted = [e for e in harness.journal.pending_events(limit=100_000) if e.type == "adapted"]
    assert len(adapted) == len(decisions(harness)) > 0
    latest = harness.controller.latest_slice
    assert latest is not None and "obs_fiducial_score" in latest["metrics"]
    # The fiducial's window is no specimen in the labels (255, like the simulator's truth of the mark);
    # the rest is segmented, and the slice's phase fractions are of the specimen.
    labels = tifffile.imread(run_dir / "slices" / "0003_labels.tif")
    assert (labels[8:72, 8:136] == OUTSIDE_LABEL).all()
    assert (labels[72:] != OUTSIDE_LABEL).all() and (labels[:, 136:] != OUTSIDE_LABEL).all()
    assert latest["metrics"]["fraction_outside"] == pytest.approx(64 * 128 / (256 * 192))


async def test_a_lost_fiducial_suspends_and_nothing_is_milled_after(
    harness: Harness, sim: SimulatorProcess
) -> None:
    async def lose(n: int) -> None:
        if n == 3:
            await sim_call(sim, "DELETE", "fiducial")

    harness.recorder.hooks["acquire"] = lose
    await harness.controller.command("start", {"recipe": RECIPE})
    await harness.wait_state("suspended", limit_s=240)
    assert "fiducial" in (harness.controller.reason or "")
    assert (
        "adapt" in harness.controller.alerts
        and "fiducial lost" in harness.controller.alerts["adapt"]["message"]
    )
    commands = harness.recorder.commands()
    third = [i for i, c in enumerate(commands) if c == "acquire"][2]
    assert "mill" not in commands[third:] and "deposit_pt" not in commands[third:]


async def test_a_policy_that_raises_suspends(
    harness: Harness, sim: SimulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(history: Any, recipe: Any) -> list[Decision]:
        if len(history) >= 2:
            raise ZeroDivisionError("focus reference is zero")
        return []

    monkeypatch.setitem(adapt.POLICIES, "focus", broken)
    await harness.controller.command("start", {"recipe": RECIPE})
    await harness.wait_state("suspended", limit_s=240)
    assert "ZeroDivisionError" in harness.controller.alerts["adapt"]["message"]
    acquires = [i for i, c in enumerate(harness.recorder.commands()) if c == "acquire"]
    assert len(acquires) == 2 and "mill" not in harness.recorder.commands()[acquires[1] :]


async def test_a_restarted_daemon_goes_on_with_the_same_loop(harness: Harness, sim: SimulatorProcess) -> None:
    async def pause(n: int) -> None:
        if n == 4:
            await harness.controller.command("pause", {})

    harness.recorder.hooks["acquire"] = pause
    await harness.controller.command("start", {"recipe": RECIPE})
    await harness.wait_state("paused", limit_s=240)
    run = harness.controller.run
    assert run is not None
    # What a restarted daemon rebuilds from the journal and the run directory.
    record = harness.journal.active_run()
    assert record is not None
    restored = recovery.load_run(harness.journal, harness.settings.data_root, record)
    assert restored.next_slice == run.next_slice
    assert [o.slice_index for o in restored.adapt.history] == [o.slice_index for o in run.adapt.history]
    assert restored.adapt.history[-1].settings == run.adapt.history[-1].settings
    assert restored.adapt.settings_for(run.next_slice) == run.adapt.settings_for(run.next_slice)
    assert restored.adapt.reference_slice == 0
    # The restored fiducial reference measures the next image as the running daemon would.
    images = adapting.read_slice_images(run, run.next_slice - 1)
    assert (
        restored.adapt.measure(run.next_slice - 1, images)[1]
        == run.adapt.measure(run.next_slice - 1, images)[1]
    )
