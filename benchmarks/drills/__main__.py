"""`python -m benchmarks.drills` (`make bench-drills`): every drill at the issue's full counts, figures
printed as a table (the README's are from this command). CI runs the same drills at smaller counts
(tests/drills/).

    python -m benchmarks.drills [--kills 20] [--slices 24] [--commands 10000] [--only sigkill,fuzz,disk]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

from benchmarks.drills.disk_full import disk_full_drill
from benchmarks.drills.fuzz import fuzz_drill
from benchmarks.drills.sigkill import sigkill_drill
from benchmarks.readme_tables import Table, publish
from kintsugi_daemon.demo.broker import mosquitto_binaries

Rows = list[tuple[str, str, object]]


async def _sigkill(root: Path, kills: int, slices: int) -> Rows:
    t0 = time.monotonic()
    r = await sigkill_drill(root / "sigkill", slices=slices, random_kills=kills, seed=2026)
    print(f"SIGKILL drill: {len(r.kills)} kills in one {slices}-slice run ({time.monotonic() - t0:.0f} s)")
    print("chosen kills (aimed -> landed): " + "; ".join(f"{k.point} -> {k.landed}" for k in r.kills[:4]))
    landed = collections.Counter(k.daemon_path for k in r.kills)
    name = f"SIGKILL, one {slices}-slice run"
    face_ok = r.sim_face_m == r.last_image_face_m
    return [
        (
            name,
            "kills: 4 chosen (inside a Pt deposit and a mill, as the instrument reported; inside a torn "
            f"TIFF write and a journal transaction, by failpoint) + {kills} random; where (journal state)",
            f"{len(r.kills)} ({', '.join(f'{n} {k}' for k, n in landed.most_common())})",
        ),
        (
            "",
            "slices milled by the instrument / asked; repeated / skipped",
            f"{r.sim_slices} / {r.slices}; {r.repeated} / {r.skipped}",
        ),
        ("", "instrument face == the last image's face", _yes(face_ok)),
        (
            "",
            "TIFFs that decode / bad; slice records contiguous",
            f"{r.tiffs} / {r.bad_tiffs}; {_yes(r.records == list(range(r.slices)))}",
        ),
        (
            "",
            "at each kill, before any reopen: incomplete files other than temp files; torn temp files / "
            "left after reopen",
            f"{sum(k.incomplete for k in r.kills)}; {sum(k.temps for k in r.kills)} / "
            f"{sum(max(k.temps_after_reopen, 0) for k in r.kills)}",
        ),
        (
            "",
            "events journaled / seen by a persistent subscriber; seq gaps per session "
            f"({r.sessions} sessions)",
            f"{r.events_journaled} / {r.events_seen}; {r.seq_gaps}",
        ),
    ]


async def _fuzz(root: Path, commands: int) -> Rows:
    r = await fuzz_drill(root / "fuzz", commands=commands, seed=2026)
    unchanged = (
        r.state_after.get("path") == r.state_before.get("path") and r.files_unchanged and r.face_unchanged
    )
    return [
        (
            "MQTT command fuzz, paused run",
            "fuzzed commands / replies / accepted / unanswered",
            f"{r.sent:,} / {r.replies:,} / {r.accepted} / {r.unanswered}",
        ),
        (
            "",
            "unauthorised commands (monitor, another instrument's daemon, an operator of another "
            "instrument) that reached the daemon",
            f"{r.reached_daemon_unauthorised} of {r.unauthorised:,}",
        ),
        (
            "",
            "run state, files, instrument face afterwards; run resumed and finished",
            f"{'unchanged' if unchanged else '**changed**'}; {_yes(r.finished_after)}",
        ),
        ("", "refusals answered per second", f"{r.rate_per_s:.0f}"),
    ]


async def _disk(root: Path) -> Rows:
    rows: Rows = []
    for filling in ("low", "zero"):
        what = "below the guard" if filling == "low" else "nothing free (ENOSPC, SQLite full mid-step)"
        name = "Disk full, tmpfs with the runs and the journal" if not rows else ""
        try:
            r = await disk_full_drill(root / f"disk-{filling}", filling=filling)
        except PermissionError as exc:
            rows.append((name, what, f"skipped: {exc}"))
            continue
        rows.append(
            (
                name,
                f"{what}: suspended with the disk alert / s; resumed after space returned / s; "
                "corrupt files; journal integrity; run finished",
                f"{_yes(r.suspended and bool(r.alert))}, {r.seconds_to_suspend:.1f} s; "
                f"{r.seconds_to_resume:.1f} s; {r.corrupt_at_full + r.corrupt_after}; {r.journal_integrity}; "
                f"{r.run_state}",
            )
        )
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    table = Table(["drill", "figure", "result"])
    with tempfile.TemporaryDirectory(prefix="kintsugi-drills-") as tmp:
        root = Path(tmp)
        rows: Rows = []
        if "sigkill" in only:
            rows += await _sigkill(root, args.kills, args.slices)
        if "fuzz" in only:
            rows += await _fuzz(root, args.commands)
        if "disk" in only:
            rows += await _disk(root)
    for row in rows:
        table.add(*row)
    publish("drills", table)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.drills", description=__doc__)
    p.add_argument("--kills", type=int, default=20, help="random SIGKILL points (after the 4 chosen)")
    p.add_argument("--slices", type=int, default=24)  # long enough for 20 random kills to land in it
    p.add_argument("--commands", type=int, default=10_000)
    p.add_argument("--only", default="sigkill,fuzz,disk")
    if mosquitto_binaries() is None:
        raise SystemExit("the drills need mosquitto (and mosquitto_passwd)")
    asyncio.run(main(p.parse_args()))
