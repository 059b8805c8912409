"""Disk full on a real (tmpfs) filesystem holding the run folder and the journal
(benchmarks/drills/disk_full.py). Skipped, with the reason, where the machine does not allow mounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.drills.disk_full import disk_full_drill, mount_tmpfs
from tests.support.mqtt_broker import mosquitto_available

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


def _can_mount(tmp_path: Path) -> str | None:
    try:
        with mount_tmpfs(tmp_path / "probe", 1024 * 1024):
            return None
    except PermissionError as exc:
        return str(exc)


@pytest.mark.parametrize("filling", ["low", "zero"])
async def test_disk_full_suspends_and_resumes(tmp_path: Path, filling: str) -> None:
    """low: less free space than the guard asks for; zero: none at all, so a write or a journal commit
    hits ENOSPC mid-step. Both: suspended with the disk alert, no corrupt file, resumed when the space
    came back, the run done, the journal intact. Mutations seen red: the disk guard's reading forced
    clear (guards.py: both fillings fault instead of suspending); and (zero) without the controller's
    disk-full handling (states/disk.py: the reserve, ENOSPC and SQLite "database or disk is full" taken
    as the disk guard) the run loop died on the error and the daemon never said suspended."""
    reason = _can_mount(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    report = await disk_full_drill(tmp_path, filling=filling)
    assert report.suspended and not report.faulted, report
    assert report.alert is not None and report.alert.get("severity") is not None, report
    assert report.files_checked > 0 and report.corrupt_at_full == 0
    assert report.resumed and report.run_state == "done", report
    assert report.corrupt_after == 0 and report.temps_after == 0
    assert report.journal_integrity == "ok"
    assert report.daemon_exit == 0, report.log_tail
