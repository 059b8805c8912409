"""SIGKILL the daemon again and again during one run, restart it each time, and check that the run came
out as if nothing had happened.

Kill points: chosen ones, confirmed where they landed (inside a Pt deposit and inside a mill: the
simulator reports the verb running; inside an atomic file write and inside a journal transaction:
failpoints, see kintsugi_daemon/service/failpoints.py), then random delays after each restart. After a
kill inside a file write the run folder is inspected *before* any daemon reopens it: only temp files may
be incomplete. After the last kill the daemon finishes the run, and then:
- the simulator milled exactly `slices` slices (0 repeated, 0 skipped) and its face is where the last
  slice's image says it was; every slice advanced the face by one slice thickness (a repeated mill shows
  as two, a skipped one as none);
- every TIFF opens and decodes; slice records are 0..N-1 with no gap; no temp file is left;
- a persistent subscriber saw every journaled event, and each session's `seq` is gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import tifffile

from benchmarks.drills.rig import INSTRUMENT_ID, Rig, drill_recipe, rig
from kintsugi_daemon.cli.remote import DaemonView
from kintsugi_daemon.service.failpoints import FAILPOINT_ENV, MARK_ENV
from kintsugi_daemon.service.journal import Journal

__all__ = ["CHOSEN_POINTS", "Kill", "SigkillReport", "inspect_run_dir", "sigkill_drill"]

CHOSEN_POINTS = ("deposit_pt", "mill", "file_write", "journal_commit")
SLICE_THICKNESS_M = 40e-9
WAIT_S = 90.0


@dataclass(frozen=True)
class Kill:
    point: str  # what was aimed at
    landed: str  # where it landed, as confirmed (failpoint mark, instrument verb, or the journal)
    daemon_path: str  # the journal's state path at the kill
    open_steps: tuple[str, ...]  # intents without an outcome at the kill
    temps: int = 0  # temp files in the run folder at the kill, before any reopen
    incomplete: int = 0  # non-temp files that would not open at the kill (must be 0)
    temps_after_reopen: int = -1  # temp files once the next daemon has recovered (must be 0)


@dataclass
class SigkillReport:
    slices: int
    kills: list[Kill] = field(default_factory=list)
    run_state: str = ""
    sim_slices: int = -1
    sim_face_m: float = float("nan")
    last_image_face_m: float = float("nan")
    advances_m: list[float] = field(default_factory=list)
    tiffs: int = 0
    bad_tiffs: int = 0
    records: list[int] = field(default_factory=list)
    temps_left: int = -1
    events_journaled: int = 0
    events_seen: int = 0
    seq_gaps: int = -1
    sessions: int = 0
    wall_s: float = 0.0

    @property
    def repeated(self) -> int:
        return max(self.sim_slices - self.slices, 0) + sum(
            1 for a in self.advances_m if a > 1.4 * SLICE_THICKNESS_M
        )

    @property
    def skipped(self) -> int:
        return max(self.slices - self.sim_slices, 0) + sum(
            1 for a in self.advances_m if a < 0.6 * SLICE_THICKNESS_M
        )


def inspect_run_dir(run_dir: Path) -> tuple[int, int, int]:
    """(temp files, complete files checked, files that do not open): TIFFs must decode, JSON parse."""
    temps = incomplete = checked = 0
    for path in run_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temps += 1
            continue
        checked += 1
        try:
            if path.suffix == ".tif":
                tifffile.imread(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:
            incomplete += 1
    return temps, checked, incomplete


class _Subscriber:
    """A persistent QoS 1 monitor of the events: (session, seq) of everything it receives."""

    def __init__(self, r: Rig) -> None:
        self.r = r
        self.seen: set[tuple[str, int]] = set()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        user, password = self.r.broker.credentials("monitor")
        while True:
            try:
                async with aiomqtt.Client(
                    self.r.broker.host,
                    self.r.broker.port,
                    username=user,
                    password=password,
                    identifier="sigkill-drill-monitor",
                    clean_session=False,
                ) as client:
                    await client.subscribe(f"kintsugi/v1/{INSTRUMENT_ID}/events/#", qos=1)
                    self.ready.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        envelope = json.loads(message.payload)
                        self.seen.add((str(envelope["session"]), int(envelope["seq"])))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)


async def _until_settled(r: Rig) -> DaemonView:
    """After a (re)start: until the daemon is online at rest (idle, paused or done)."""

    def settled(view: DaemonView) -> bool:
        status = view.status or {}
        return status.get("state") == "online" and status.get("path") in ("idle", "paused", "done")

    return await r.operator().watch(settled, WAIT_S)


async def _run_finished(r: Rig) -> None:
    await r.wait_for("done", timeout_s=24 * 3600.0)  # cancelled by the caller when the kill comes first


async def _aim(r: Rig, point: str, mark: Path, rng: random.Random) -> str | None:
    """Wait until the daemon is at `point`; return where it is, or None if the run finished first."""
    if point == "random":
        await asyncio.sleep(rng.uniform(0.1, 3.0))
        return "random"
    if point in ("file_write", "journal_commit"):
        while not mark.exists():
            await asyncio.sleep(0.01)
        return mark.read_text().split()[0]
    while True:  # an instrument verb: the simulator says when it is patterning
        state = await r.sim_get("/v1/state")
        if state["busy"] == point and state["patterning"] == "running":
            return f"inside {point} (instrument patterning)"
        await asyncio.sleep(0.01)


def _temps(r: Rig) -> int:
    return sum(inspect_run_dir(p)[0] for p in r.data_root.iterdir() if p.is_dir())


async def _cycle(
    r: Rig, n: int, point: str, rng: random.Random, recipe: str
) -> tuple[Kill | None, bool, int]:
    """Start the daemon (armed for `point`), get the run going, kill it at `point`.
    (kill, run done, temp files once the daemon had recovered)."""
    mark = r.root / f"failpoint-{n}.mark"
    env: dict[str, str] = {}
    if point == "file_write":
        env = {FAILPOINT_ENV: f"file_write@{rng.randint(1, 4)}", MARK_ENV: str(mark)}
    elif point == "journal_commit":
        env = {FAILPOINT_ENV: f"journal_commit@{rng.randint(3, 20)}", MARK_ENV: str(mark)}
    daemon = await r.start_daemon(f"daemon-{n:02d}.log", env)
    try:
        view = await _until_settled(r)
        recovered_temps = _temps(r) if r.data_root.exists() else 0
        path = (view.status or {}).get("path")
        if path == "done" or (path == "idle" and n > 0):  # a restart after the run ended boots idle
            return None, True, recovered_temps
        verb, fields = ("start", {"recipe": recipe}) if path == "idle" else ("resume", {})
        reply = await r.operator().command(verb, fields)
        assert reply["accepted"], reply
        aim = asyncio.create_task(_aim(r, point, mark, rng))
        finished = asyncio.create_task(_run_finished(r))
        done, _ = await asyncio.wait({aim, finished}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        for task in (aim, finished):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task
        if aim not in done:
            if finished in done:
                return None, True, recovered_temps
            raise TimeoutError(f"kill point {point} not reached within {WAIT_S:g} s")
        landed = aim.result() or point
    finally:
        if daemon.returncode is None:
            daemon.kill()  # SIGKILL
        await daemon.wait()
    journal = Journal(r.data_root / "journal.sqlite", "inspector")
    try:
        path_at_kill = journal.daemon_state()[0]
        run = journal.active_run()
        open_steps = tuple(s.step for s in journal.open_steps(run.run_id)) if run else ()
    finally:
        journal.close()
    if path_at_kill == "done":  # the point was reached only as the run ended: not a kill inside it
        return None, True, recovered_temps
    temps = incomplete = 0
    for run_dir in (p for p in r.data_root.iterdir() if p.is_dir()):
        t, _, bad = inspect_run_dir(run_dir)  # before any daemon reopens the folder
        temps, incomplete = temps + t, incomplete + bad
    return Kill(point, landed, path_at_kill, open_steps, temps, incomplete), False, recovered_temps


async def sigkill_drill(
    root: Path,
    *,
    slices: int,
    random_kills: int,
    chosen: Sequence[str] = CHOSEN_POINTS,
    seed: int = 0,
    time_scale: float = 0.15,
) -> SigkillReport:
    rng = random.Random(seed)
    report = SigkillReport(slices=slices)
    recipe = drill_recipe(slices, pt_every=2)
    t0 = time.monotonic()
    async with rig(root, time_scale=time_scale) as r:
        subscriber = _Subscriber(r)
        listener = asyncio.create_task(subscriber.run())
        try:
            await asyncio.wait_for(subscriber.ready.wait(), WAIT_S)
            finished = False
            for n, point in enumerate([*chosen, *["random"] * random_kills]):
                kill, finished, recovered_temps = await _cycle(r, n, point, rng, recipe)
                with (r.root / "kills.jsonl").open("a") as log:  # what happened, for whoever reads it
                    log.write(
                        json.dumps(
                            {
                                "n": n,
                                "point": point,
                                "kill": dataclasses.asdict(kill) if kill else None,
                                "finished": finished,
                            }
                        )
                        + "\n"
                    )
                _after_reopen(report, recovered_temps)
                if kill is not None:
                    report.kills.append(kill)
                if finished:
                    break
            daemon = await r.start_daemon("daemon-final.log")
            try:
                view = await _until_settled(r)
                _after_reopen(report, _temps(r))
                if (view.status or {}).get("path") == "paused":  # else the run already finished
                    assert (await r.operator().command("resume"))["accepted"]
                    await r.wait_for("done", timeout_s=300)
            finally:
                daemon.terminate()
                await asyncio.wait_for(daemon.wait(), 60)
            await _check(r, report, subscriber)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    report.wall_s = time.monotonic() - t0
    return report


def _after_reopen(report: SigkillReport, temps: int) -> None:
    if report.kills and report.kills[-1].temps_after_reopen < 0:
        report.kills[-1] = dataclasses.replace(report.kills[-1], temps_after_reopen=temps)


async def _check(r: Rig, report: SigkillReport, subscriber: _Subscriber) -> None:
    journal = Journal(r.data_root / "journal.sqlite", "inspector")
    try:
        (run,) = journal.runs()
        report.run_state = run.state
        report.events_journaled = journal.last_seq()
        async with asyncio.timeout(30):  # the outbox drains to the subscriber
            while (
                len({seq for _, seq in subscriber.seen}) < report.events_journaled or journal.unsent_count()
            ):
                await asyncio.sleep(0.05)
    finally:
        journal.close()
    face = await r.sim_get("/test/face")
    report.sim_slices, report.sim_face_m = int(face["slice_index"]), float(face["face_position_m"])
    run_dir = r.data_root / run.run_id
    report.temps_left, _, report.bad_tiffs = inspect_run_dir(run_dir)
    slices_dir = run_dir / "slices"
    report.records = sorted(int(p.stem) for p in slices_dir.glob("[0-9][0-9][0-9][0-9].json"))
    faces = []
    for index in report.records:
        record = json.loads((slices_dir / f"{index:04d}.json").read_text())
        cbs = run_dir / record["files"]["cbs"]
        with tifffile.TiffFile(cbs) as tif:
            meta: dict[str, Any] = json.loads(tif.pages.first.description)
            tif.asarray()
        faces.append(float(meta["face_position_m"]))
    report.tiffs = sum(1 for _ in slices_dir.glob("*.tif"))
    report.last_image_face_m = faces[-1] if faces else float("nan")
    report.advances_m = [b - a for a, b in zip([0.0, *faces], faces, strict=False)]
    seqs = {seq for _, seq in subscriber.seen}
    report.events_seen = len(seqs)
    by_session: dict[str, list[int]] = {}
    for session, seq in subscriber.seen:
        by_session.setdefault(session, []).append(seq)
    report.sessions = len(by_session)
    gaps = len(set(range(1, report.events_journaled + 1)) - seqs)
    for values in by_session.values():
        values.sort()
        gaps += sum(1 for a, b in itertools.pairwise(values) if b != a + 1)
    report.seq_gaps = gaps
