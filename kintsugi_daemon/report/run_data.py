"""Everything a report needs, read back from a run directory and the daemon's journal (read-only).

The run directory is the record of the run (manifest, slice records, segmentation records, label
TIFFs, previews); the journal (`<data_root>/journal.sqlite`, by default the run directory's parent)
adds the timeline: every step with its wall-clock start and end, and every event (pauses, suspends,
faults, alerts, adaptive decisions). The journal is opened read-only, so a report can be made while
the daemon is running, and a report without a journal says so instead of failing.
"""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EventRow", "ReportInputError", "RunData", "SliceData", "StepRow", "load_run"]


class ReportInputError(ValueError):
    """The folder is not a readable run directory; the message names the file."""


@dataclass(frozen=True)
class SliceData:
    index: int
    metadata: dict[str, Any]
    image_paths: dict[str, Path]
    metrics: dict[str, Any] | None  # the segmentation's per-slice metrics, None if not segmented
    labels_path: Path | None
    overlay_path: Path | None

    @property
    def face_position_m(self) -> float | None:
        z = self.metadata.get("face_position_m")
        return float(z) if isinstance(z, int | float) and math.isfinite(z) else None


@dataclass(frozen=True)
class StepRow:
    slice_index: int
    step: str
    started: float
    completed: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None


@dataclass(frozen=True)
class EventRow:
    seq: int
    type: str
    time: float
    data: dict[str, Any]


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    recipe_text: str | None
    slices: list[SliceData]
    steps: list[StepRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    journal_path: Path | None = None
    journal_note: str | None = None  # why the timeline is missing or partial
    skipped: list[str] = field(default_factory=list)  # slices left out, with the reason

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.run_dir.name)

    @property
    def pixel_size_m(self) -> float | None:
        for source in ([s.metadata for s in self.slices[:1]], [self.manifest]):
            for d in source:
                value = d.get("pixel_size_m")
                if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                    return float(value)
        return None

    @property
    def slice_spacing_m(self) -> float | None:
        """Mean spacing of the measured face positions (adaptive runs vary it), else the recipe's."""
        zs = [z for s in self.slices if (z := s.face_position_m) is not None]
        if len(zs) > 1 and zs[-1] > zs[0]:
            return (zs[-1] - zs[0]) / (len(zs) - 1)
        value = self.manifest.get("slice_thickness_m")
        return float(value) if isinstance(value, int | float) and value > 0 else None

    def depth_um(self, s: SliceData) -> float:
        """Depth of a slice's face below the first imaged face, in µm (index x spacing if unknown)."""
        first = self.slices[0].face_position_m if self.slices else None
        z = s.face_position_m
        if z is not None and first is not None:
            return (z - first) * 1e6
        return s.index * (self.slice_spacing_m or 0.0) * 1e6


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"{path}: unreadable or not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: not a JSON object")
    return data


def _slice(run_dir: Path, record_path: Path) -> SliceData:
    record = _read_json(record_path)
    index = int(record["index"])
    files = record.get("files") or {}
    images = {str(k): run_dir / str(v) for k, v in files.items() if k not in ("labels", "overlay")}
    metrics: dict[str, Any] | None = None
    labels = run_dir / str(files["labels"]) if "labels" in files else None
    overlay = run_dir / str(files["overlay"]) if "overlay" in files else None
    seg_path = record_path.with_name(f"{index:04d}.segmentation.json")
    if seg_path.is_file():
        seg = _read_json(seg_path)
        seg_files = seg.get("files") or {}
        labels = run_dir / str(seg_files["labels"]) if "labels" in seg_files else labels
        overlay = run_dir / str(seg_files["overlay"]) if "overlay" in seg_files else overlay
        block = seg.get("metrics")
        # The daemon nests the metrics with the inference time beside them: {"metrics": {...}, ...}.
        inner = block.get("metrics") if isinstance(block, dict) else None
        metrics = inner if isinstance(inner, dict) else block if isinstance(block, dict) else None
    metadata = record.get("metadata")
    return SliceData(
        index=index,
        metadata=metadata if isinstance(metadata, dict) else {},
        image_paths=images,
        metrics=metrics,
        labels_path=labels if labels is not None and labels.is_file() else None,
        overlay_path=overlay if overlay is not None and overlay.is_file() else None,
    )


def load_run(run_dir: Path, journal: Path | None = None) -> RunData:
    """The run's files and, when the journal is found, its timeline."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportInputError(f"{run_dir}: no such run directory")
    manifest = _read_json(run_dir / "run.json")
    recipe = run_dir / "recipe.toml"
    data = RunData(
        run_dir=run_dir,
        manifest=manifest,
        recipe_text=recipe.read_text() if recipe.is_file() else None,
        slices=[],
    )
    for path in sorted((run_dir / "slices").glob("[0-9][0-9][0-9][0-9]*.json")):
        if path.name.endswith(".segmentation.json"):
            continue
        try:
            data.slices.append(_slice(run_dir, path))
        except (ReportInputError, KeyError, TypeError, ValueError) as exc:
            data.skipped.append(f"{path.name}: {exc}")
    data.slices.sort(key=lambda s: s.index)
    _read_journal(data, journal if journal is not None else run_dir.parent / "journal.sqlite")
    return data


def _read_journal(data: RunData, path: Path) -> None:
    if not path.is_file():
        data.journal_note = f"no journal at {path}: the timeline is not available (give --journal)"
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        data.journal_note = f"{path}: cannot be opened read-only ({exc})"
        return
    try:
        steps = conn.execute(
            "SELECT slice_index, step, started, completed, result, error FROM steps WHERE run_id = ? "
            "ORDER BY id",
            (data.run_id,),
        ).fetchall()
        events = conn.execute(
            "SELECT seq, type, time, data FROM outbox WHERE run_id = ? ORDER BY seq", (data.run_id,)
        ).fetchall()
    except sqlite3.Error as exc:
        data.journal_note = f"{path}: not a kintsugi journal ({exc})"
        return
    finally:
        conn.close()
    data.journal_path = path
    data.steps = [
        StepRow(int(i), str(step), float(t0), t1, _loads(result), _loads(error))
        for i, step, t0, t1, result, error in steps
    ]
    data.events = [EventRow(int(seq), str(kind), float(t), _loads(d) or {}) for seq, kind, t, d in events]
    if not data.steps and not data.events:
        data.journal_note = f"{path} holds nothing about run {data.run_id}"


def _loads(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}
