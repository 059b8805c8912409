"""`kintsugi report`: one self-contained HTML file (figures embedded as data URIs, no network at view
time) and a PDF of the same summary and figures."""

from __future__ import annotations

import base64
import html
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from kintsugi_daemon import __version__
from kintsugi_daemon.report.figures import ReportFigure, all_figures
from kintsugi_daemon.report.run_data import RunData, load_run
from kintsugi_daemon.report.volume import VolumeMetrics, volume_metrics
from kintsugi_daemon.service.atomic import write_atomic

__all__ = ["ReportFiles", "build_report", "write_report"]

# Per-step and per-slice events are the timeline's bars; the table lists what a person looks for.
_ROUTINE_EVENTS = frozenset({"step_started", "step_completed", "segmented", "slice_completed"})
_MEAN_KEYS = [
    ("porosity", "porosity"),
    ("fraction_unfilled_pore", "unfilled pore fraction"),
    ("fraction_cbd", "CBD fraction"),
    ("fraction_active", "active (NMC) fraction"),
    ("cbd_coverage", "CBD coverage of NMC"),
    ("confidence", "segmentation confidence"),
]


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    pdf: Path


@dataclass
class Report:
    run: RunData
    volume: VolumeMetrics | None
    volume_note: str | None
    figures: list[ReportFigure]
    summary: list[tuple[str, str]]
    sections: list[tuple[str, list[tuple[str, str]]]]  # (heading, rows) tables beside the figures


def _label_stack(run: RunData) -> tuple[np.ndarray | None, str | None]:
    paths = [s.labels_path for s in run.slices if s.labels_path is not None]
    if len(paths) < 2:
        return None, f"needs segmented slices: {len(paths)} in this run"
    planes: list[np.ndarray] = []
    for path in paths:
        plane = tifffile.imread(path)
        if planes and plane.shape != planes[0].shape:
            return None, f"{path.name} is {plane.shape}, the first label image {planes[0].shape}"
        planes.append(plane)
    return np.stack(planes), None


def _when(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float) and value > 1e9:  # an epoch time (an alert's `since`)
        return _when(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _summary(run: RunData) -> list[tuple[str, str]]:
    m = run.manifest
    events = Counter(e.type for e in run.events)
    preflight = next((e.data for e in run.events if e.type == "preflight"), {})
    instrument = preflight.get("instrument") or {}
    finished = next((e.data for e in run.events if e.type == "run_finished"), {})
    zs = [z for s in run.slices if (z := s.face_position_m) is not None]
    rows = [
        ("run", f"{run.run_id} ({m.get('name', '?')})"),
        (
            "outcome",
            str(m.get("state", "?"))
            + (f" ({how})" if (how := finished.get("how")) != m.get("state") else ""),
        ),
        ("slices", f"{m.get('completed_slices', len(run.slices))} of {m.get('total_slices', '?')}"),
        ("started / last update", f"{_when(m.get('started'))} / {_when(m.get('updated'))}"),
    ]
    if isinstance(m.get("started"), int | float) and isinstance(m.get("updated"), int | float):
        rows.append(("wall time", f"{(m['updated'] - m['started']) / 60:.1f} min"))
    if len(zs) > 1:
        rows.append(
            ("depth imaged", f"{(zs[-1] - zs[0]) * 1e6:.3f} µm from the first to the last of {len(zs)} faces")
        )
    if (spacing := run.slice_spacing_m) is not None:
        rows.append(("mean slice spacing", f"{spacing * 1e9:.1f} nm"))
    if (pixel := run.pixel_size_m) is not None:
        rows.append(("pixel size", f"{pixel * 1e9:.1f} nm"))
    rows.append(("detectors", ", ".join(map(str, m.get("detectors") or [])) or "?"))
    if instrument:
        rows.append(("instrument", f"{instrument.get('model', '?')} ({instrument.get('serial', '?')})"))
    rows.append(
        (
            "interruptions",
            f"{events['paused']} pauses, {events['suspended']} suspends, {events['fault']} faults, "
            f"{events['alert_raised']} alerts",
        )
    )
    return rows


def _step_table(run: RunData) -> list[tuple[str, str]]:
    rows = []
    for name in dict.fromkeys(s.step for s in run.steps):
        steps = [s for s in run.steps if s.step == name]
        done = [s.completed - s.started for s in steps if s.completed is not None]
        failed = sum(1 for s in steps if s.error)
        rows.append(
            (
                name,
                f"{len(steps)} run, {failed} failed, {sum(done):.1f} s in all, "
                f"{(sum(done) / len(done)) if done else 0:.2f} s mean",
            )
        )
    return rows


def _event_table(run: RunData) -> list[tuple[str, str]]:
    t0 = run.events[0].time if run.events else 0.0
    rows = []
    for e in run.events:
        if e.type in _ROUTINE_EVENTS:
            continue
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in e.data.items() if not isinstance(v, dict | list))
        rows.append((f"+{(e.time - t0) / 60:.2f} min  #{e.seq}", f"{e.type}: {detail}"[:240]))
    return rows


def _decision_table(run: RunData) -> list[tuple[str, str]]:
    rows = []
    policies = set()
    for s in run.steps:
        if s.step != "adapt" or not s.result:
            continue
        policies.add(str(s.result.get("policy", "?")))
        decisions = s.result.get("decisions") or {}
        if isinstance(decisions, list):  # the adaptive policy's decision records (adapt/decisions.py)
            for d in decisions:
                rows.append(
                    (
                        f"slice {d.get('basis_slice')} -> {d.get('applies_to_slice')}",
                        f"{d.get('policy')} {d.get('action')}: {d.get('why')}",
                    )
                )
        elif decisions:
            rows.append((f"slice {s.slice_index}", ", ".join(f"{k}={_fmt(v)}" for k, v in decisions.items())))
    recorded = bool(rows)  # the adapt steps' records already list what the `adapted` events say
    for e in run.events:
        if e.type == "adapted" and not recorded:
            rows.append((f"event #{e.seq}", ", ".join(f"{k}={_fmt(v)}" for k, v in e.data.items())))
    if not rows and policies:
        rows.append(("none", f"policy {', '.join(sorted(policies))}: no decision changed the plan"))
    elif not rows:
        rows.append(("none", "no slice reached the adapt step"))
    return rows


def _means(run: RunData) -> list[tuple[str, str]]:
    rows = []
    for key, label in _MEAN_KEYS:
        values = [
            float(v) for s in run.slices if s.metrics and isinstance(v := s.metrics.get(key), int | float)
        ]
        if values:
            rows.append((label, f"{np.mean(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"))
    return rows


def _cracks(run: RunData) -> list[tuple[str, str]]:
    totals = Counter[str]()
    for s in run.slices:
        for key in ("cracks_pt_filled", "cracks_cbd_filled", "cracks_empty"):
            if s.metrics and isinstance(v := s.metrics.get(key), int | float):
                totals[key] += int(v)
    n = sum(totals.values())
    if not n:
        return [("cracks", "none found (or no segmentation)")]
    filled = totals["cracks_pt_filled"] + totals["cracks_cbd_filled"]
    return [
        ("Pt-filled", str(totals["cracks_pt_filled"])),
        ("CBD-filled", str(totals["cracks_cbd_filled"])),
        ("empty", str(totals["cracks_empty"])),
        ("filled share", f"{filled / n:.2f} of {n} crack sections"),
    ]


def _volume_table(volume: VolumeMetrics | None, note: str | None) -> list[tuple[str, str]]:
    if volume is None:
        return [("volume metrics", f"unavailable: {note}")]
    z, y, x = volume.voxel_um
    rows = [
        (
            "stack",
            f"{volume.shape_zyx[0]} x {volume.shape_zyx[1]} x {volume.shape_zyx[2]} voxels of "
            f"{z * 1e3:.0f} x {y * 1e3:.0f} x {x * 1e3:.0f} nm"
            + (f" (x, y subsampled by {volume.subsampled_xy})" if volume.subsampled_xy > 1 else ""),
        )
    ]
    values = [
        ("porosity", volume.porosity, "", "porosity"),
        ("electrode porosity (collector excluded)", volume.electrode_porosity, "", "porosity"),
        ("specific surface area, pore", volume.ssa_pore_um_inv, " µm⁻¹", "ssa"),
        ("specific surface area, active material", volume.ssa_active_um_inv, " µm⁻¹", "ssa"),
        ("pore diameter d50", volume.pore_sizes.d50_um if volume.pore_sizes else None, " µm", "pore_sizes"),
        ("tortuosity factor (pores, through depth)", volume.tortuosity_factor, "", "tortuosity_factor"),
    ]
    for label, value, unit, key in values:
        why = volume.unavailable.get(key, "not defined for this stack")
        rows.append((label, f"{value:.3f}{unit}" if value is not None else f"unavailable: {why}"))
    return rows


def build_report(run_dir: Path, journal: Path | None = None) -> Report:
    run = load_run(run_dir, journal)
    stack, note = _label_stack(run)
    volume = None
    if stack is not None:
        pixel, spacing = run.pixel_size_m, run.slice_spacing_m
        if pixel is None or spacing is None:
            note = "the run records no pixel size or slice spacing"
        else:
            volume = volume_metrics(stack, (spacing, pixel, pixel))
    sections = [
        ("Steps", _step_table(run)),
        ("Events", _event_table(run)),
        ("Adaptive decisions", _decision_table(run)),
        ("Per-slice means", _means(run)),
        ("Cracks", _cracks(run)),
        ("EDX cross-check", [("EDX", "did not run in this run: no EDX maps in the run directory")]),
        ("Volume metrics", _volume_table(volume, note)),
    ]
    notes = [("journal", run.journal_note)] if run.journal_note else []
    notes += [("skipped", s) for s in run.skipped]
    if notes:
        sections.append(("Notes", notes))
    return Report(run, volume, note, all_figures(run, volume), _summary(run), sections)


# -------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td { padding: 2px 12px 2px 0; vertical-align: top; }
td:first-child { color: #555; white-space: nowrap; } figure { margin: 1em 0; }
figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f6f6; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
.meta { color: #777; font-size: 0.85em; }
"""
# Counts the figures that really decoded, so a headless browser's DOM dump can prove they render.
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('figure img');
  var ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute('data-figures-loaded', String(ok));
});
"""


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _figure_html(fig: ReportFigure) -> str:
    data = base64.b64encode(fig.png()).decode()
    return (
        f'<figure id="figure-{fig.key}"><img alt="{html.escape(fig.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(fig.caption)}</figcaption></figure>'
    )


def render_html(report: Report) -> str:
    run = report.run
    figures = {f.key: f for f in report.figures}
    sections = dict(report.sections)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>kintsugi report {html.escape(run.run_id)}</title><style>{_CSS}</style>",
        f"<script>{_SCRIPT}</script></head>",
        f"<body data-figures='{len(report.figures)}'>",
        f"<h1>Kintsugi run report: {html.escape(run.run_id)}</h1>",
        f"<p class='meta'>Written {_when(time.time())} by kintsugi-daemon {html.escape(__version__)} "
        f"from {html.escape(str(run.run_dir))}</p>",
        "<h2>Summary</h2>",
        _table(report.summary),
    ]
    order = [
        ("Timeline", ["timeline"], ["Steps", "Events"]),
        ("Adaptive decisions", [], ["Adaptive decisions"]),
        ("Slices", ["montage"], []),
        ("Phase fractions vs depth", ["fractions"], ["Per-slice means"]),
        ("Cracks", ["cracks"], ["Cracks"]),
        ("EDX cross-check", [], ["EDX cross-check"]),
        ("Volume metrics", ["pore-sizes"], ["Volume metrics"]),
        ("Notes", [], ["Notes"]),
    ]
    for heading, figure_keys, tables in order:
        blocks = [_figure_html(figures[k]) for k in figure_keys if k in figures]
        blocks += [_table(sections[t]) for t in tables if sections.get(t)]
        if heading == "Timeline" and run.journal_note:
            blocks.append(f"<p>{html.escape(run.journal_note)}</p>")
        if blocks:
            parts += [f"<h2>{heading}</h2>", *blocks]
    if run.recipe_text:
        parts += ["<h2>Recipe</h2>", f"<pre>{html.escape(run.recipe_text)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- PDF


def _text_page(title: str, rows: list[tuple[str, str]]) -> Figure:
    fig = Figure(figsize=(8.27, 11.69))  # A4 portrait
    fig.text(0.06, 0.96, title, fontsize=14, weight="bold", va="top")
    y = 0.92
    for key, value in rows:
        if y < 0.04:
            break
        fig.text(0.06, y, key, fontsize=8, color="#555555", va="top")
        fig.text(0.36, y, value[:110], fontsize=8, va="top")
        y -= 0.018
    return fig


def write_pdf(report: Report, path: Path) -> None:
    def write(fh: Any) -> None:
        with PdfPages(fh, metadata={"Title": f"kintsugi report {report.run.run_id}"}) as pdf:
            rows = list(report.summary)
            for heading, table in report.sections:
                rows += [("", ""), (heading.upper(), ""), *table]
            pdf.savefig(_text_page(f"Kintsugi run report: {report.run.run_id}", rows))
            for fig in report.figures:
                fig.figure.suptitle(fig.title)
                pdf.savefig(fig.figure, bbox_inches="tight")

    write_atomic(path, write)


def write_report(run_dir: Path, out_dir: Path | None = None, journal: Path | None = None) -> ReportFiles:
    """report.html and report.pdf in `out_dir` (default: `<run_dir>/report/`), each written atomically."""
    report = build_report(run_dir, journal)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / f"{report.run.run_id}_report.html", out / f"{report.run.run_id}_report.pdf")
    text = render_html(report)
    write_atomic(files.html, lambda fh: fh.write(text.encode()))
    write_pdf(report, files.pdf)
    return files
