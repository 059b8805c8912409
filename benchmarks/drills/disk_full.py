"""Disk full, for real: the run folder and the journal on a small tmpfs, filled up mid-run by another
process's file. The daemon must suspend with the disk alert (not fault, not crash), leave no corrupt file,
and resume on its own when the space comes back.

Two fillings: `low` leaves less free space than the recipe's guard (the guard trips at a step boundary);
`zero` leaves nothing at all, so a TIFF write or a journal commit meets ENOSPC / SQLite's "database or
disk is full" in the middle of a step, which must end the same way.

Mounting needs root (or CAP_SYS_ADMIN); `mount_tmpfs` says why when it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.drills.rig import drill_recipe, rig
from benchmarks.drills.sigkill import inspect_run_dir
from kintsugi_daemon.cli.remote import DaemonView

__all__ = ["DiskFullReport", "disk_full_drill", "mount_tmpfs"]

DISK_BYTES = 24 * 1024 * 1024
GUARD_BYTES = 4 * 1024 * 1024


@dataclass
class DiskFullReport:
    filling: str
    suspended: bool = False
    faulted: bool = False
    alert: dict[str, object] | None = None
    files_checked: int = 0
    corrupt_at_full: int = 0
    resumed: bool = False
    run_state: str = ""
    corrupt_after: int = -1
    journal_integrity: str = ""
    temps_after: int = -1
    daemon_exit: int | None = None
    seconds_to_suspend: float = 0.0
    seconds_to_resume: float = 0.0
    log_tail: list[str] = field(default_factory=list)


@contextlib.contextmanager
def mount_tmpfs(where: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` at `where`; raises PermissionError (with the reason) when not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Another process's file taking all but `leave_bytes` of the disk."""
    filler = disk / "filler.bin"
    st = os.statvfs(disk)
    size = max(st.f_bavail * st.f_frsize - leave_bytes, 0)
    with filler.open("ab") as fh:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= fh.write(chunk[: min(size, len(chunk))])
            except OSError:  # ENOSPC: it is full, which is the point
                break
            fh.flush()
    return filler


async def disk_full_drill(root: Path, *, filling: str = "low", slices: int = 5) -> DiskFullReport:
    report = DiskFullReport(filling=filling)
    with mount_tmpfs(root / "disk", DISK_BYTES) as disk:
        async with rig(root / "rig", time_scale=0.15, data_root=disk / "runs") as r:
            daemon = await r.start_daemon("daemon.log")
            try:
                await r.wait_for("idle")
                recipe = drill_recipe(slices, min_free_disk_bytes=GUARD_BYTES)
                assert (await r.operator().command("start", {"recipe": recipe}))["accepted"]
                await r.wait_for("running.image")  # a slice on its way: the disk fills under it
                filler = _fill(disk, leave_bytes=GUARD_BYTES // 4 if filling == "low" else 0)
                t0 = time.monotonic()

                def stuck(view: DaemonView) -> bool:
                    status = view.status or {}
                    return status.get("path") in ("suspended", "faulted") or status.get("state") == "lost"

                view = await r.operator().watch(stuck, 120)
                report.seconds_to_suspend = time.monotonic() - t0
                path = (view.status or {}).get("path")
                report.suspended, report.faulted = path == "suspended", path == "faulted"
                with contextlib.suppress(TimeoutError):  # retained alerts come in any order: wait for it
                    view = await r.operator().watch(lambda v: any("disk" in k for k in v.alerts), 30)
                report.alert = next((a for k, a in view.alerts.items() if "disk" in k), None)
                run_dir = next(p for p in (disk / "runs").iterdir() if p.is_dir())
                _, report.files_checked, report.corrupt_at_full = inspect_run_dir(run_dir)
                if report.suspended:
                    filler.unlink()  # the space comes back
                    t1 = time.monotonic()
                    await r.wait_for("done", timeout_s=180)
                    report.seconds_to_resume = time.monotonic() - t1
                    report.resumed = True
                view = await r.operator().snapshot()
                report.run_state = str((view.status or {}).get("path"))
                report.temps_after, _, report.corrupt_after = inspect_run_dir(run_dir)
                with contextlib.closing(sqlite3.connect(disk / "runs" / "journal.sqlite")) as db:
                    report.journal_integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
            finally:
                if daemon.returncode is None:
                    daemon.terminate()
                report.daemon_exit = await asyncio.wait_for(daemon.wait(), 60)
                report.log_tail = (r.root / "daemon.log").read_text(errors="replace").splitlines()[-5:]
    return report
