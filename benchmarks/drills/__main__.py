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
from kintsugi_daemon.demo.broker import mosquitto_binaries


def _row(name: str, value: object) -> None:
    print(f"  {name:<58} {value}")


async def _sigkill(root: Path, kills: int, slices: int) -> None:
    t0 = time.monotonic()
    r = await sigkill_drill(root / "sigkill", slices=slices, random_kills=kills, seed=2026)
    landed = collections.Counter(k.daemon_path for k in r.kills)
    print(f"SIGKILL drill: {len(r.kills)} kills in one {slices}-slice run ({time.monotonic() - t0:.0f} s)")
    _row("chosen kills (aimed -> landed)", "; ".join(f"{k.point} -> {k.landed}" for k in r.kills[:4]))
    _row("where the kills landed (journal state at the kill)", dict(landed))
    _row(
        "torn temp files at the kills / left after each reopen",
        f"{sum(k.temps for k in r.kills)} / {sum(max(k.temps_after_reopen, 0) for k in r.kills)}",
    )
    _row("incomplete non-temp files at any kill", sum(k.incomplete for k in r.kills))
    _row("slices milled by the instrument / asked", f"{r.sim_slices} / {r.slices}")
    _row("repeated / skipped slices", f"{r.repeated} / {r.skipped}")
    _row("face: instrument == last image", r.sim_face_m == r.last_image_face_m)
    _row(
        "TIFFs decoded / bad; slice records contiguous",
        f"{r.tiffs} / {r.bad_tiffs}; {r.records == list(range(r.slices))}",
    )
    _row(
        "events journaled / seen; seq gaps; sessions",
        f"{r.events_journaled} / {r.events_seen}; {r.seq_gaps}; {r.sessions}",
    )


async def _fuzz(root: Path, commands: int) -> None:
    r = await fuzz_drill(root / "fuzz", commands=commands, seed=2026)
    print(f"MQTT command fuzz: {r.sent} fuzzed + {r.unauthorised} unauthorised against a paused run")
    _row("replies / accepted / unanswered", f"{r.replies} / {r.accepted} / {r.unanswered}")
    _row("unauthorised commands that reached the daemon", r.reached_daemon_unauthorised)
    _row(
        "state, files, instrument face unchanged",
        r.state_after.get("path") == r.state_before.get("path") and r.files_unchanged and r.face_unchanged,
    )
    _row("throughput (commands answered per second)", f"{r.rate_per_s:.0f}")
    _row("run resumed and finished afterwards", r.finished_after)


async def _disk(root: Path) -> None:
    for filling in ("low", "zero"):
        try:
            r = await disk_full_drill(root / f"disk-{filling}", filling=filling)
        except PermissionError as exc:
            print(f"disk full ({filling}): skipped: {exc}")
            continue
        print(f"disk full ({filling}: {'below the guard' if filling == 'low' else 'nothing free'}), tmpfs")
        _row("suspended (not faulted) / alert", f"{r.suspended} / {bool(r.alert)}")
        _row(
            "seconds to suspend / to resume after space returned",
            f"{r.seconds_to_suspend:.1f} / {r.seconds_to_resume:.1f}",
        )
        _row(
            "corrupt files at full / after; journal integrity",
            f"{r.corrupt_at_full} / {r.corrupt_after}; {r.journal_integrity}",
        )
        _row("run finished", r.run_state)


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="kintsugi-drills-") as tmp:
        root = Path(tmp)
        if "sigkill" in only:
            await _sigkill(root, args.kills, args.slices)
        if "fuzz" in only:
            await _fuzz(root, args.commands)
        if "disk" in only:
            await _disk(root)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.drills", description=__doc__)
    p.add_argument("--kills", type=int, default=20, help="random SIGKILL points (after the 4 chosen)")
    p.add_argument("--slices", type=int, default=24)  # long enough for 20 random kills to land in it
    p.add_argument("--commands", type=int, default=10_000)
    p.add_argument("--only", default="sigkill,fuzz,disk")
    if mosquitto_binaries() is None:
        raise SystemExit("the drills need mosquitto (and mosquitto_passwd)")
    asyncio.run(main(p.parse_args()))
