"""The report's reading of a run: real run storage and a real journal, written the way the daemon does,
with a clock injected so the timeline is known."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kintsugi_daemon.report.document import build_report, render_html, write_report
from kintsugi_daemon.report.run_data import ReportInputError
from kintsugi_daemon.service.journal import EventDraft, Journal
from kintsugi_daemon.service.storage import RunStorage

RUN = "run-7"
H, W = 48, 64


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        self.t += 1.5
        return self.t


def labels(i: int) -> np.ndarray:
    out = np.full((H, W), 2, np.uint8)  # active
    out[:, 10 + i : 20 + i] = 0  # a Pt-filled pore band that moves with depth
    out[30:34, :] = 3  # a CBD band
    out[-4:, :] = 4  # collector
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Three slices with a pause, a suspend, a fault and an adaptive decision in the journal."""
    data_root = tmp_path / "data"
    storage = RunStorage(data_root, RUN, create=True)
    storage.write_recipe("[run]\nname = 'report test'\nslices = 3\n")
    with Journal(data_root / "journal.sqlite", session="s-1", clock=Clock()) as j:
        j.create_run(
            RUN, {"run": {"name": "report test"}}, 3, [EventDraft("run_created", {"slices": 3}, RUN)]
        )
        for i in range(3):
            for step in ("deposit_pt", "mill", "image"):
                sid = j.begin_step(RUN, i, step, {"slice": i})
                if step == "mill" and i == 1:
                    j.fail_step(sid, {"kind": "instrument_fault", "message": "stage stuck"})
                    j.set_state("faulted", "stage stuck", RUN, [EventDraft("fault", {"step": "mill"}, RUN)])
                    j.set_state(
                        "paused", "operator", RUN, [EventDraft("paused", {"reason": "operator"}, RUN)]
                    )
                    sid = j.begin_step(RUN, i, step, {"slice": i})
                j.complete_step(sid, {"duration_s": 1.0})
            sid = j.begin_step(RUN, i, "adapt", {"slice": i})
            decisions = {"redeposit_pt": True} if i == 2 else {}
            j.complete_step(sid, {"policy": "kintsugi", "decisions": decisions})
            if i == 0:
                j.set_state("suspended", "vacuum", RUN, [EventDraft("suspended", {"guard": "vacuum"}, RUN)])
                j.set_state("running", "guards clear", RUN, [EventDraft("resumed", {}, RUN)])
            face = 1e-6 + 40e-9 * i
            images = {"cbs": np.full((H, W), 1000 * (i + 1), np.uint16)}
            storage.write_slice(i, images, {"pixel_size_m": 50e-9, "face_position_m": face})
            metrics = {
                "porosity": 0.2 + 0.01 * i,
                "fraction_cbd": 0.08,
                "fraction_active": 0.6,
                "cracks": 3,
                "cracks_pt_filled": 1,
                "cracks_cbd_filled": 1,
                "cracks_empty": 1,
            }
            storage.write_segmentation(i, labels(i), np.zeros((H, W, 3), np.uint8), {"metrics": metrics})
        j.finish_run(RUN, "done", [EventDraft("run_finished", {"how": "done"}, RUN)])
    storage.write_manifest(
        {
            "run_id": RUN,
            "name": "report test",
            "state": "done",
            "total_slices": 3,
            "completed_slices": 3,
            "detectors": ["cbs"],
            "pixel_size_m": 50e-9,
            "slice_thickness_m": 40e-9,
        }
    )
    return storage.run_dir


def test_timeline_lists_every_interruption_and_decision(run_dir: Path) -> None:
    report = build_report(run_dir)
    summary = dict(report.summary)
    assert summary["interruptions"] == "1 pauses, 1 suspends, 1 faults, 0 alerts"
    assert summary["slices"] == "3 of 3"
    sections = dict(report.sections)
    events = [v for _, v in sections["Events"]]
    assert [e.split(":")[0] for e in events] == [
        "run_created",
        "suspended",
        "resumed",
        "fault",
        "paused",
        "run_finished",
    ]
    assert dict(sections["Steps"])["mill"].startswith("4 run, 1 failed")
    assert sections["Adaptive decisions"] == [("slice 2", "redeposit_pt=True")]
    cracks = dict(sections["Cracks"])
    assert cracks["empty"] == "3" and cracks["filled share"].startswith("0.67 of 9")
    assert [f.key for f in report.figures] == ["timeline", "montage", "fractions", "cracks", "pore-sizes"]
    volume = dict(sections["Volume metrics"])
    # Pore band 10 px wide out of 44 specimen rows x 64: the stack's porosity is the labels' own.
    expected = float(np.mean([np.mean(labels(i) <= 1) for i in range(3)]))
    assert volume["porosity"] == f"{expected:.3f}"


def test_html_is_self_contained(run_dir: Path, tmp_path: Path) -> None:
    files = write_report(run_dir, tmp_path / "out")
    text = files.html.read_text()
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []  # nothing to fetch: it opens offline
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', text)) == 5
    assert files.pdf.read_bytes().startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", files.pdf.read_bytes())) == 1 + 5  # summary + figures


def test_without_a_journal_the_report_says_so(run_dir: Path) -> None:
    (run_dir.parent / "journal.sqlite").rename(run_dir.parent / "elsewhere.sqlite")
    report = build_report(run_dir)
    assert report.run.journal_note is not None and "no journal at" in report.run.journal_note
    assert "timeline" not in [f.key for f in report.figures]
    assert "no journal at" in render_html(report)
    moved = build_report(run_dir, run_dir.parent / "elsewhere.sqlite")  # --journal
    assert moved.run.journal_note is None and next(f.key for f in moved.figures) == "timeline"


def test_bad_run_directory_names_the_file(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(ReportInputError, match="no such run directory"):
        build_report(tmp_path / "nope")
    (run_dir / "run.json").write_text("{torn")
    with pytest.raises(ReportInputError, match=r"run\.json: unreadable or not JSON"):
        build_report(run_dir)
