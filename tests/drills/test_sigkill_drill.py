"""SIGKILL drills (benchmarks/drills/sigkill.py): the daemon killed inside a Pt deposit, a mill, a torn
file write and a journal transaction, then at random points, restarted after each kill; the run must come
out exactly as one that was never interrupted.

CI kills at the four chosen points plus KINTSUGI_DRILL_KILLS random ones (default 4) in a 6-slice run;
`python -m benchmarks.drills` kills at 20 random points in a longer run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.drills.sigkill import CHOSEN_POINTS, sigkill_drill
from tests.support.mqtt_broker import mosquitto_available

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

RANDOM_KILLS = int(os.environ.get("KINTSUGI_DRILL_KILLS", "4"))
SLICES = 6


async def test_sigkill_at_chosen_and_random_points(tmp_path: Path) -> None:
    """Mutations seen red: reconciliation disabled (`reconcile` says a mill never happened: the slice is
    milled twice, sim_slices 7 and one advance of two slices); stale temp files kept on reopen; atomic
    writes straight to the final name (a torn TIFF found at the kill)."""
    report = await sigkill_drill(tmp_path, slices=SLICES, random_kills=RANDOM_KILLS, seed=7)
    chosen = report.kills[: len(CHOSEN_POINTS)]
    assert [k.point for k in chosen] == list(CHOSEN_POINTS)
    deposit, mill, write, commit = chosen
    # Each chosen kill landed where it was aimed, as the instrument, the failpoint and the journal agree.
    assert (
        deposit.landed == "inside deposit_pt (instrument patterning)" and "deposit_pt" in deposit.open_steps
    )
    assert mill.landed == "inside mill (instrument patterning)" and "mill" in mill.open_steps
    assert write.landed == "file_write" and write.temps >= 1  # a torn temp file, left by the kill ...
    assert write.temps_after_reopen == 0  # ... removed by the next daemon when it reopened the run
    assert commit.landed == "journal_commit"
    assert len(report.kills) > len(CHOSEN_POINTS)  # random kills landed before the run finished too
    for kill in report.kills:
        assert kill.incomplete == 0, kill  # at every kill, before any reopen: only temp files incomplete
        assert kill.temps_after_reopen == 0, kill
    assert report.run_state == "done"
    # The instrument milled exactly SLICES slices and is where the last image says: 0 repeated, 0 skipped.
    assert report.sim_slices == SLICES and report.repeated == 0 and report.skipped == 0
    assert report.sim_face_m == report.last_image_face_m
    assert len(report.advances_m) == SLICES
    assert report.records == list(range(SLICES))  # contiguous slice records
    assert report.tiffs == 2 * SLICES and report.bad_tiffs == 0 and report.temps_left == 0
    assert report.events_seen == report.events_journaled and report.seq_gaps == 0
    assert report.sessions >= 2
