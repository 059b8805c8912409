"""The demo's summary: read back from the files the daemon wrote and its journal (read-only)."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["print_summary", "summarise"]


def _journal_numbers(journal: Path, run_id: str) -> tuple[dict[str, list[float]], int, int]:
    """Per-detector mean grey per slice (image steps' results) and the run's outbox events (all, sent).

    Opened read-only after the daemon has exited: the journal is the daemon's, the demo only reads it."""
    greys: dict[str, list[float]] = {}
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT result FROM steps WHERE run_id = ? AND step = 'image' AND completed IS NOT NULL "
            "AND error IS NULL ORDER BY slice_index",
            (run_id,),
        ).fetchall()
        for (result,) in rows:
            for name, grey in (json.loads(result or "{}").get("mean_grey") or {}).items():
                greys.setdefault(name, []).append(float(grey))
        total, sent = conn.execute(
            "SELECT count(*), count(sent) FROM outbox WHERE run_id = ?", (run_id,)
        ).fetchone()
    finally:
        conn.close()
    return greys, int(total), int(sent)


def summarise(
    run_dir: Path,
    journal: Path,
    *,
    instrument: dict[str, float] | None,
    wall_run_s: float,
    wall_demo_s: float,
    events_seen: int,
    alerts: dict[str, dict[str, Any]],
    daemon_exit: str,
) -> dict[str, Any]:
    manifest = json.loads((run_dir / "run.json").read_text())
    slices = sorted((run_dir / "slices").glob("[0-9][0-9][0-9][0-9].json"))
    records = [json.loads(p.read_text()) for p in slices]
    faces = [float(r["metadata"]["face_position_m"]) for r in records if "face_position_m" in r["metadata"]]
    segs = [
        json.loads(p.read_text())["metrics"]["metrics"]
        for p in sorted((run_dir / "slices").glob("*.segmentation.json"))
    ]
    greys, outbox, sent = _journal_numbers(journal, manifest["run_id"])
    adapted = [
        json.loads(p.read_text())
        for p in sorted((run_dir / "slices").glob("[0-9][0-9][0-9][0-9].adapt.json"))
    ]
    tifs = list((run_dir / "slices").glob("*.tif"))
    return {
        "run_id": manifest["run_id"],
        "state": manifest.get("state"),
        "completed": manifest.get("completed_slices", len(records)),
        "total": manifest.get("total_slices"),
        "faces_m": faces,
        "instrument": instrument,
        "wall_run_s": wall_run_s,
        "wall_demo_s": wall_demo_s,
        "greys": greys,
        "segmentation": segs,
        "policy": adapted[0]["policy"] if adapted else "fixed",
        "decisions": [d for record in adapted for d in record["decisions"]],
        "outbox": outbox,
        "sent": sent,
        "events_seen": events_seen,
        "alerts": alerts,
        "images": sum(1 for p in tifs if not p.name.endswith("_labels.tif")),
        "labels": sum(1 for p in tifs if p.name.endswith("_labels.tif")),
        "previews": len(list((run_dir / "previews").glob("*.png"))),
        "records": len(records),
        "daemon_exit": daemon_exit,
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _decision_lines(policy: str, decisions: list[dict[str, Any]], shown: int = 12) -> list[str]:
    """What the adaptive policy decided: counts per policy and action, then the decisions themselves."""
    if policy != "adaptive":
        return [f"  adaptation        {policy}: no decisions (the recipe's schedule)"]
    counts: dict[str, int] = {}
    for d in decisions:
        key = f"{d['policy']}/{d['action']}"
        counts[key] = counts.get(key, 0) + 1
    listed = ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    out = [f"  adaptation        adaptive: {len(decisions)} decisions" + (f" ({listed})" if listed else "")]
    for d in decisions[:shown]:
        out.append(
            f"    slice {d['basis_slice']:>4} -> {d['applies_to_slice']:<4} {d['policy']:<10} "
            f"{d['action']:<24} {d['why']}"
        )
    if len(decisions) > shown:
        out.append(f"    ... {len(decisions) - shown} more in slices/NNNN.adapt.json and on events/adapted")
    return out


def print_summary(s: dict[str, Any], run_dir: Path) -> None:
    out: list[str] = ["", "kintsugi demo summary"]
    out.append(f"  run               {s['run_id']} ({s['state']})")
    out.append(f"  slices            {s['completed']} of {s['total']} requested")
    faces = s["faces_m"]
    if faces:
        steps = [b - a for a, b in itertools.pairwise(faces)] or [faces[0]]
        out.append(
            f"  milled depth      {faces[-1] * 1e6:.3f} um (slice {_mean(steps) * 1e9:.1f} nm, "
            f"min {min(steps) * 1e9:.1f}, max {max(steps) * 1e9:.1f})"
        )
    inst = s["instrument"]
    inst_text = f"{inst['instrument_time_s'] / 60:.1f} min instrument" if inst else "instrument time unknown"
    out.append(
        f"  time              {inst_text}, {s['wall_run_s']:.1f} s wall for the run "
        f"({s['wall_demo_s']:.1f} s with start-up and shut-down)"
    )
    for det, values in s["greys"].items():
        out.append(
            f"  {det.upper():<4} mean grey     {_mean(values):.0f} "
            f"(min {min(values):.0f}, max {max(values):.0f})"
        )
    segs = s["segmentation"]
    if segs:
        for key, label in (
            ("porosity", "porosity"),
            ("unfilled_pore_share", "unfilled pores"),
            ("cbd_coverage", "CBD coverage"),
            ("confidence", "confidence"),
        ):
            values = [float(m[key]) for m in segs if isinstance(m.get(key), int | float)]
            if values:
                out.append(f"  {label:<17} {_mean(values):.3f} (mean of {len(values)} slices)")
    else:
        out.append("  segmentation      off")
    out += _decision_lines(s.get("policy", "fixed"), s.get("decisions", []))
    out.append(
        f"  events            {s['outbox']} journaled, {s['sent']} published, "
        f"{s['events_seen']} seen by the demo"
    )
    alerts = s["alerts"]
    out.append(
        "  alerts            "
        + (", ".join(f"{k} ({a.get('severity')})" for k, a in alerts.items()) if alerts else "none")
    )
    out.append(f"  daemon            {s['daemon_exit']}")
    files = f"{s['images']} TIFFs, {s['records']} slice records"
    if s["labels"] or s["previews"]:
        files += f", {s['labels']} label TIFFs, {s['previews']} previews"
    out.append(f"  files             {files}, run.json, recipe.toml")
    if s.get("report"):
        out.append(f"  report            {s['report']}")
    out.append(f"  output folder     {run_dir}")
    print("\n".join(out), flush=True)
