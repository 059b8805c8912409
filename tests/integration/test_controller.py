"""The run controller against a real simulator process: the exact instrument commands a run, a pause,
an abort and a fault produce (collected, then compared as lists, bluesky-style), and crash recovery."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from kintsugi_daemon.config import DaemonSettings
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.states.controller import CommandRefused, Controller
from tests.support.simulator import SimStarter

QUERIES = {"state", "identity"}  # reads; the lists below are the commands that change the instrument


def recipe(
    slices: int = 3,
    *,
    pt_every: int = 2,
    mill_current: float = 15e-9,
    segmentation: bool = False,
    model: str = "builtin",
    detectors: str = '["cbs", "tld"]',
) -> str:
    return f"""
[run]
name = "test"
slices = {slices}
slice_thickness_m = 40e-9

[roi]
width_m = 10e-6
height_m = 8e-6

[pt]
every_slices = {pt_every}

[mill]
current_a = {mill_current!r}

[imaging]
detectors = {detectors}
width_px = 192
height_px = 128

[segmentation]
enabled = {str(segmentation).lower()}
model = "{model}"

[guards]
min_free_disk_bytes = 0
settle_s = 0.2
poll_s = 0.1
"""


@dataclass
class Recorder:
    """Wraps the real client and records every verb called, in order (and the request objects sent)."""

    inner: HttpDualBeam
    calls: list[str] = field(default_factory=list)
    sent: list[tuple[str, Any]] = field(default_factory=list)
    hooks: dict[str, Callable[[int], Awaitable[None]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, verb: str) -> Any:
        method = getattr(self.inner, verb)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(verb)
            if args:
                self.sent.append((verb, args[0]))
            n = self.counts[verb] = self.counts.get(verb, 0) + 1
            hook = self.hooks.get(verb)
            if hook is not None:
                await hook(n)
            return await method(*args, **kwargs)

        return call

    def commands(self) -> list[str]:
        return [c for c in self.calls if c not in QUERIES]


@dataclass
class Harness:
    controller: Controller
    recorder: Recorder
    journal: Journal
    sim: SimulatorProcess
    settings: DaemonSettings

    async def wait_state(self, *states: str, limit_s: float = 60.0) -> None:
        async with asyncio.timeout(limit_s):
            while self.controller.state not in states:
                if self.controller.state == "faulted":
                    raise AssertionError(f"faulted: {self.controller.reason}")
                await asyncio.sleep(0.01)


async def make_harness(
    sim: SimulatorProcess, tmp_path: Path, session: str = "s1"
) -> tuple[Harness, HttpDualBeam]:
    settings = DaemonSettings(data_root=tmp_path / "runs")
    settings.data_root.mkdir(parents=True, exist_ok=True)
    journal = Journal(settings.journal_file, session)
    client = HttpDualBeam(sim.url, token=sim.token, deadline_scale=0.05)
    recorder = Recorder(client)
    controller = Controller(instrument=recorder, journal=journal, settings=settings)
    await controller.boot()
    return Harness(controller, recorder, journal, sim, settings), client


@pytest.fixture
async def harness(sim: SimulatorProcess, tmp_path: Path) -> AsyncIterator[Harness]:
    h, client = await make_harness(sim, tmp_path)
    yield h
    await h.controller.close()
    await client.aclose()
    h.journal.close()


SLICE = ["mill", "polish", "set_beam_shift", "acquire"]


async def test_run_issues_the_fixed_schedule(harness: Harness) -> None:
    assert harness.controller.state == "idle"
    reply = await harness.controller.command("start", {"recipe": recipe(3, pt_every=2)})
    await harness.wait_state("done")
    assert harness.recorder.commands() == ["deposit_pt", *SLICE, *SLICE, "deposit_pt", *SLICE]
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "done"
    assert harness.journal.last_checkpoint(reply["run_id"])[0] == 2  # type: ignore[index]
    assert harness.journal.open_steps(reply["run_id"]) == []
    # Every slice's images are on disk; the event stream tells the story in order.
    run_dir = harness.settings.data_root / reply["run_id"]
    assert sorted(p.name for p in (run_dir / "slices").glob("*_cbs.tif")) == [
        f"{i:04d}_cbs.tif" for i in range(3)
    ]
    types = [e.type for e in harness.journal.pending_events(1000)]
    assert types[:3] == ["run_created", "run_started", "preflight"]
    assert types.count("slice_completed") == 3 and types[-1] == "done"
    seqs = [e.seq for e in harness.journal.pending_events(1000)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_the_journaled_intent_is_the_request_sent(harness: Harness) -> None:
    reply = await harness.controller.command("start", {"recipe": recipe(3, pt_every=2)})
    await harness.wait_state("done")
    verbs = {"deposit_pt": "deposit_pt", "mill": "mill", "polish": "polish"}  # journal step -> client verb
    intents = [(verbs[r.step], r.params) for r in harness.journal.steps(reply["run_id"]) if r.step in verbs]
    sent = [(verb, request) for verb, request in harness.recorder.sent if verb in verbs.values()]
    expected = ["deposit_pt", "mill", "polish", "mill", "polish", "deposit_pt", "mill", "polish"]
    assert [v for v, _ in intents] == [v for v, _ in sent] == expected
    for (_, params), (_, request) in zip(intents, sent, strict=True):
        assert params["request"] == request.model_dump(mode="json")
        assert type(request).model_validate(params["request"]) == request
        assert {"face_before_m", "cap_before_m"} <= params.keys()


async def test_the_critical_path_reads_state_from_the_operations_answers(harness: Harness) -> None:
    """Each operation's answer carries the instrument's state: between steps the daemon reads it at most
    once a slice (after the adapt step, which answers nothing), not before every step. Seen red with the
    answers' state ignored: 22 reads for 4 slices."""
    slices = 4
    await harness.controller.command("start", {"recipe": recipe(slices, pt_every=1)})
    await harness.wait_state("done")
    reads = harness.recorder.calls.count("state")
    assert reads <= 2 + slices, harness.recorder.calls  # preflight and the first boundary, then one a slice
    assert harness.controller.latest.reads == reads - 1  # all but preflight's went through the cache


async def test_deferred_pause_waits_for_the_step_boundary(harness: Harness) -> None:
    async def pause_on_second_mill(n: int) -> None:
        if n == 2:
            await harness.controller.command("pause", {"now": False})

    harness.recorder.hooks["mill"] = pause_on_second_mill
    await harness.controller.command("start", {"recipe": recipe(3, pt_every=0)})
    await harness.wait_state("paused")
    # The mill that was running when the pause came finished; nothing after it started.
    assert harness.recorder.commands() == [*SLICE, "mill"]
    with pytest.raises(CommandRefused):
        await harness.controller.command("pause", {})
    await harness.controller.command("resume", {})
    await harness.wait_state("done")
    assert harness.recorder.commands() == [*SLICE, *SLICE, *SLICE]


async def test_abort_stops_and_makes_safe(harness: Harness) -> None:
    async def abort_on_polish(n: int) -> None:
        if n == 2:
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(harness.controller.command("abort", {}))
            )

    harness.recorder.hooks["polish"] = abort_on_polish
    reply = await harness.controller.command("start", {"recipe": recipe(4, pt_every=0)})
    await harness.wait_state("done")
    commands = harness.recorder.commands()
    assert commands[: len(SLICE) + 2] == [*SLICE, "mill", "polish"]
    assert commands[-2:] == ["stop", "safe_state"]
    assert "acquire" not in commands[len(SLICE) :]
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "aborted"


async def test_fault_goes_safe_then_clear_and_resume(harness: Harness) -> None:
    async with httpx.AsyncClient(
        base_url=harness.sim.url, headers={"Authorization": f"Bearer {harness.sim.token}"}
    ) as http:
        (
            await http.post("/test/faults", json={"kind": "gis_heater_failure", "verb": "any"})
        ).raise_for_status()
        await harness.controller.command("start", {"recipe": recipe(2, pt_every=1)})
        await harness.wait_state("faulted")
        assert harness.recorder.commands() == ["deposit_pt", "safe_state"]
        assert "fault" in harness.controller.alerts
        (await http.delete("/test/faults")).raise_for_status()
    with pytest.raises(CommandRefused):
        await harness.controller.command("resume", {})  # a fault needs `clear` first
    await harness.controller.command("clear", {})
    assert harness.controller.state == "paused" and not harness.controller.alerts
    await harness.controller.command("resume", {})
    await harness.wait_state("done")
    assert harness.recorder.commands()[2:] == ["deposit_pt", *SLICE, "deposit_pt", *SLICE]


async def test_refused_commands_change_nothing(harness: Harness) -> None:
    for verb, args in [
        ("resume", {}),
        ("pause", {}),
        ("stop", {}),
        ("clear", {}),
        ("dance", {}),
        ("start", {"recipe": "[run]\nname='x'\n"}),
        ("start", {}),
    ]:
        with pytest.raises(CommandRefused):
            await harness.controller.command(verb, args)
        assert harness.controller.state == "idle"
    assert harness.recorder.commands() == []
    assert harness.journal.active_run() is None


async def test_crash_mid_mill_is_reconciled_not_repeated(start_sim: SimStarter, tmp_path: Path) -> None:
    async with start_sim("--time-scale", "0", "--test-endpoints") as sim:
        h, client = await make_harness(sim, tmp_path, session="before-crash")
        crashed = asyncio.Event()

        async def crash_in_second_mill(n: int) -> None:
            if n == 2:
                # The mill reaches the instrument, but the daemon "dies" before journaling the completion.
                await h.recorder.inner.mill(*crash_args)
                crashed.set()
                await asyncio.sleep(3600)

        crash_args: list[Any] = []
        original_mill = h.recorder.inner.mill

        async def capture(*args: Any, **kwargs: Any) -> Any:
            crash_args[:] = args
            return await original_mill(*args, **kwargs)

        h.recorder.inner.mill = capture  # type: ignore[method-assign]
        h.recorder.hooks["mill"] = crash_in_second_mill
        reply = await h.controller.command("start", {"recipe": recipe(3, pt_every=0)})
        await asyncio.wait_for(crashed.wait(), 30)
        assert h.controller._task is not None
        h.controller._task.cancel()  # the process is gone: nothing more is written
        h.journal.close()
        await client.aclose()

        face_before = (await HttpDualBeam(sim.url, token=sim.token).state()).face_position_m
        h2, client2 = await make_harness(sim, tmp_path, session="after-crash")
        assert h2.controller.state == "paused" and h2.controller.reason == "recovered"
        await h2.controller.command("resume", {})
        await h2.wait_state("done")
        # No second mill for slice 1: the run picks up at its polish.
        assert h2.recorder.commands() == ["polish", "set_beam_shift", "acquire", *SLICE]
        reconciled = [e for e in h2.journal.pending_events(1000) if e.type == "step_reconciled"]
        assert reconciled and reconciled[0].data["happened"] is True
        state = await client2.state()
        assert state.face_position_m > face_before  # only slice 2's mill since the crash
        run = h2.journal.run(reply["run_id"])
        assert run is not None and run.state == "done"
        await client2.aclose()
        h2.journal.close()


# CBS grey levels (/65535) of each phase at auto C/B: enough for a real ONNX model that thresholds them.
CENTRES = {"pore": 0.95, "unfilled_pore": 0.05, "active": 0.53, "cbd": 0.23, "collector": 0.40}


async def test_segmentation_runs_beside_the_instrument(harness: Harness, tmp_path: Path) -> None:
    from tests.support.onnx_models import build_threshold_model

    model = build_threshold_model(tmp_path / "threshold.onnx", CENTRES)
    reply = await harness.controller.command(
        "start", {"recipe": recipe(3, pt_every=1, segmentation=True, model=str(model))}
    )
    await harness.wait_state("done")
    # Segmentation adds no instrument command: it runs in a worker thread beside the next slice.
    assert harness.recorder.commands() == ["deposit_pt", *SLICE] * 3
    run_dir = harness.settings.data_root / reply["run_id"]
    for i in range(3):
        assert (run_dir / "slices" / f"{i:04d}_labels.tif").is_file()
        assert (run_dir / "previews" / f"{i:04d}_overlay.png").is_file()
        assert (run_dir / "slices" / f"{i:04d}.segmentation.json").is_file()
    segmented = [e for e in harness.journal.pending_events(1000) if e.type == "segmented"]
    assert [e.data["slice"] for e in segmented] == [0, 1, 2]
    assert 0.0 < segmented[-1].data["porosity"] < 1.0
    assert harness.controller.last_metrics["slice"] == 2
    assert all(r.ok for r in harness.journal.steps(reply["run_id"]) if r.step == "segment")
    # With fewer slices than the list holds, every slice is wanted for annotation, least confident first.
    wanted = [e for e in harness.journal.pending_events(1000) if e.type == "annotation_wanted"]
    assert sorted(e.data["slice"] for e in wanted) == [0, 1, 2]
    listed = json.loads((run_dir / "run.json").read_text())["annotation_wanted"]
    confidence = {e.data["slice"]: e.data["confidence"] for e in segmented}
    assert [x["slice"] for x in listed] == sorted(confidence, key=lambda i: (round(confidence[i], 4), i))


@pytest.mark.parametrize(
    ("model", "detectors", "message"),
    [
        ("/nonexistent/model.onnx", '["cbs", "tld"]', "does not exist"),
        ("THRESHOLD", '["cbs"]', "tld"),
    ],
)
async def test_model_problems_refuse_the_run_before_milling(
    harness: Harness, tmp_path: Path, model: str, detectors: str, message: str
) -> None:
    from tests.support.onnx_models import build_threshold_model

    if model == "THRESHOLD":
        model = str(build_threshold_model(tmp_path / "threshold.onnx", CENTRES))
    reply = await harness.controller.command(
        "start", {"recipe": recipe(2, segmentation=True, model=model, detectors=detectors)}
    )
    await harness.wait_state("idle")
    assert harness.recorder.commands() == []  # nothing milled, nothing deposited
    assert message in harness.controller.alerts["preflight"]["message"]
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "aborted"
    assert harness.journal.active_run() is None


async def test_a_second_run_loads_and_checks_its_own_model(harness: Harness, tmp_path: Path) -> None:
    """The daemon keeps its model between runs; a recipe that names another must not run on the old one."""
    from tests.support.onnx_models import build_threshold_model

    model = str(build_threshold_model(tmp_path / "threshold.onnx", CENTRES))
    await harness.controller.command("start", {"recipe": recipe(1, segmentation=True, model=model)})
    await harness.wait_state("done")
    milled = harness.recorder.commands()
    reply = await harness.controller.command(
        "start", {"recipe": recipe(1, segmentation=True, model="/nonexistent/model.onnx")}
    )
    await harness.wait_state("idle")
    assert harness.recorder.commands() == milled  # refused before anything was milled
    assert "does not exist" in harness.controller.alerts["preflight"]["message"]
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "aborted"


async def test_vacuum_loss_suspends_and_resumes_on_its_own(harness: Harness) -> None:
    async with httpx.AsyncClient(
        base_url=harness.sim.url, headers={"Authorization": f"Bearer {harness.sim.token}"}
    ) as http:
        # The second mill finds the chamber vented; the vacuum comes back 1.5 s later.
        fault = {"kind": "vacuum_loss", "verb": "mill", "after_calls": 1, "duration_s": 1.5}
        (await http.post("/test/faults", json=fault)).raise_for_status()
        reply = await harness.controller.command("start", {"recipe": recipe(3, pt_every=0)})
        await harness.wait_state("suspended")
        assert "guard_vacuum" in harness.controller.alerts
        assert harness.controller.reason == "guard: vacuum"
        await harness.wait_state("done")
    assert "guard_vacuum" not in harness.controller.alerts  # cleared when the vacuum came back
    # The refused mill removed nothing and was retried once; every slice got exactly one good mill.
    mills = [s for s in harness.journal.steps(reply["run_id"]) if s.step == "mill"]
    assert sorted(s.slice_index for s in mills if s.ok) == [0, 1, 2]
    assert [s.slice_index for s in mills if not s.ok] == [1]
    types = [e.type for e in harness.journal.pending_events(1000)]
    assert types.index("suspended") < types.index("resumed") < types.index("done")


async def slow_harness(start_sim: SimStarter, tmp_path: Path) -> tuple[Harness, HttpDualBeam, Any]:
    """A harness whose instrument takes real time (time scale 0.15), so a command can land mid-step."""
    cm = start_sim("--time-scale", "0.15", "--test-endpoints")
    sim = await cm.__aenter__()
    h, client = await make_harness(sim, tmp_path)
    return h, client, cm


async def close_harness(h: Harness, client: HttpDualBeam, cm: Any) -> None:
    await h.controller.close()
    await client.aclose()
    h.journal.close()
    await cm.__aexit__(None, None, None)


async def test_immediate_pause_stops_the_mill_and_finishes_it_after_resume(
    start_sim: SimStarter, tmp_path: Path
) -> None:
    h, client, cm = await slow_harness(start_sim, tmp_path)
    try:

        async def pause_now_during_second_mill(n: int) -> None:
            if n == 2:

                async def later() -> None:
                    async with asyncio.timeout(10):
                        while (await client.state()).busy != "mill":
                            await asyncio.sleep(0.02)
                    await h.controller.command("pause", {"now": True})

                asyncio.get_running_loop().create_task(later())

        h.recorder.hooks["mill"] = pause_now_during_second_mill
        reply = await h.controller.command("start", {"recipe": recipe(2, pt_every=0, mill_current=1e-9)})
        await h.wait_state("paused")
        assert h.recorder.commands() == [*SLICE, "mill", "stop"]  # patterning stopped mid-slice
        await h.controller.command("resume", {})
        await h.wait_state("done")
        assert h.recorder.commands()[6:] == [*SLICE]  # the mill is finished, then the slice goes on
        mills = [s for s in h.journal.steps(reply["run_id"], 1) if s.step == "mill"]
        assert [m.ok for m in mills] == [False, True]
        assert mills[1].params["request"]["slice_thickness_m"] < 40e-9  # only what was left of the slice
    finally:
        await close_harness(h, client, cm)


async def test_stop_finishes_the_slice_then_ends(harness: Harness) -> None:
    async def stop_on_second_mill(n: int) -> None:
        if n == 2:
            await harness.controller.command("stop", {})

    harness.recorder.hooks["mill"] = stop_on_second_mill
    reply = await harness.controller.command("start", {"recipe": recipe(4, pt_every=0)})
    await harness.wait_state("done")
    assert harness.recorder.commands() == [*SLICE, *SLICE]  # slice 1 completed, nothing after it
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "stopped"
    assert harness.journal.last_checkpoint(reply["run_id"])[0] == 1  # type: ignore[index]


async def test_halt_makes_safe_and_waits_for_clear(harness: Harness) -> None:
    halting: list[asyncio.Task[dict[str, Any]]] = []

    async def halt_on_first_polish(n: int) -> None:
        if n == 1:
            halting.append(asyncio.get_running_loop().create_task(harness.controller.command("halt", {})))

    harness.recorder.hooks["polish"] = halt_on_first_polish
    await harness.controller.command("start", {"recipe": recipe(2, pt_every=0)})
    async with asyncio.timeout(30):
        while not halting:
            await asyncio.sleep(0.01)
        await halting[0]  # the halt command has returned: the instrument is stopped and safe
    assert harness.controller.state == "faulted"
    assert harness.recorder.commands()[-2:] == ["stop", "safe_state"]
    with pytest.raises(CommandRefused):
        await harness.controller.command("resume", {})
    await harness.controller.command("clear", {})
    await harness.controller.command("resume", {})
    await harness.wait_state("done")
    assert harness.recorder.commands().count("acquire") == 2


async def test_full_disk_suspends_before_anything_is_milled(harness: Harness) -> None:
    text = recipe(2, pt_every=0).replace("min_free_disk_bytes = 0", "min_free_disk_bytes = 1000000000000000")
    reply = await harness.controller.command("start", {"recipe": text})
    await harness.wait_state("suspended")
    assert "guard_disk" in harness.controller.alerts
    assert harness.recorder.commands() == []
    await harness.controller.command("stop", {})
    await harness.wait_state("done")
    run = harness.journal.run(reply["run_id"])
    assert run is not None and run.state == "stopped"


async def test_model_without_metadata_runs_with_the_recipes_contract(
    harness: Harness, tmp_path: Path
) -> None:
    """An ONNX file without kintsugi.* props (an Avizo export) works when the recipe gives the contract."""
    import json as jsonlib

    import onnx

    from tests.support.onnx_models import build_threshold_model

    path = build_threshold_model(tmp_path / "threshold.onnx", CENTRES)
    model = onnx.load(str(path))
    contract = {p.key.removeprefix("kintsugi."): jsonlib.loads(p.value) for p in model.metadata_props}
    del model.metadata_props[:]
    onnx.save(model, str(path))
    table = ", ".join(
        f"{k} = {jsonlib.dumps(v)}"
        for k, v in contract.items()
        if k in ("tile", "halo", "stride", "layout", "pixel_size_m")
    )
    text = recipe(2, pt_every=1, segmentation=True, model=str(path))
    text += (
        f"\n[segmentation.metadata]\n{table.replace(', ', chr(10))}\n"
        f"classes = {jsonlib.dumps(contract['classes'])}\nchannels = {jsonlib.dumps(contract['channels'])}\n"
        "normalisation = [{mean = 0.0, std = 1.0}, {mean = 0.0, std = 1.0}]\n"
    )
    reply = await harness.controller.command("start", {"recipe": text})
    await harness.wait_state("done")
    segmented = [e for e in harness.journal.pending_events(1000) if e.type == "segmented"]
    assert [e.data["slice"] for e in segmented] == [0, 1]
    run_dir = harness.settings.data_root / reply["run_id"]
    assert (run_dir / "slices" / "0001_labels.tif").is_file()
