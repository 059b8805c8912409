"""The report's figures, drawn once with matplotlib (Agg, no display) and used by both the HTML (PNG)
and the PDF (vector pages): one drawing per figure, never two versions that drift apart."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Figure objects, never pyplot: no global state, no GUI backend (the support PC and CI have no display).
from matplotlib.figure import Figure

from kintsugi_daemon.report.run_data import RunData
from kintsugi_daemon.report.volume import VolumeMetrics

__all__ = [
    "ReportFigure",
    "all_figures",
    "crack_figure",
    "fractions_figure",
    "montage_figure",
    "pore_size_figure",
    "timeline_figure",
]

# Colours of the classes as the overlays draw them would be ideal; these are plain and distinguishable.
_SERIES = [
    ("porosity", "porosity (pore + unfilled)", "#1f77b4"),
    ("fraction_unfilled_pore", "unfilled pore", "#d62728"),
    ("fraction_cbd", "CBD", "#2ca02c"),
    ("fraction_active", "active (NMC)", "#ff7f0e"),
    ("fraction_collector", "collector", "#7f7f7f"),
]
# Events drawn on the timeline, with their colour.
TIMELINE_EVENTS = {
    "paused": "#9467bd",
    "pausing": "#9467bd",
    "suspended": "#d62728",
    "resumed": "#2ca02c",
    "fault": "#d62728",
    "alert_raised": "#ff7f0e",
    "alert_cleared": "#17becf",
    "adapted": "#8c564b",
    "stopping": "#7f7f7f",
    "aborting": "#d62728",
}


@dataclass(frozen=True)
class ReportFigure:
    key: str  # the HTML element id: figure-<key>
    title: str
    caption: str
    figure: Figure

    def png(self, dpi: int = 110) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        return buf.getvalue()


def _depths(run: RunData) -> list[float]:
    return [run.depth_um(s) for s in run.slices]


def fractions_figure(run: RunData) -> ReportFigure | None:
    rows = [(run.depth_um(s), s.metrics) for s in run.slices if s.metrics]
    if not rows:
        return None
    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    depth = [d for d, _ in rows]
    for key, label, colour in _SERIES:
        values = [m.get(key) for _, m in rows]
        if any(isinstance(v, int | float) for v in values):
            ys = [float(v) if isinstance(v, int | float) else np.nan for v in values]
            ax.plot(depth, ys, marker="o", markersize=3, label=label, color=colour)
    ax.set_xlabel("depth below the first slice (µm)")
    ax.set_ylabel("area fraction of the slice")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return ReportFigure(
        "fractions",
        "Phase fractions vs depth",
        f"Per-slice area fractions from the on-the-fly segmentation ({len(rows)} slices).",
        fig,
    )


def crack_figure(run: RunData) -> ReportFigure | None:
    rows = [(s.index, s.metrics) for s in run.slices if s.metrics and "cracks" in s.metrics]
    if not rows:
        return None
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    x = np.array([i for i, _ in rows])
    bottom = np.zeros(len(rows))
    for key, label, colour in (
        ("cracks_pt_filled", "Pt-filled (open to the face)", "#e6b800"),
        ("cracks_cbd_filled", "CBD-filled", "#2ca02c"),
        ("cracks_empty", "empty (closed)", "#d62728"),
    ):
        ys = np.array([float(m.get(key) or 0) for _, m in rows])
        ax.bar(x, ys, bottom=bottom, label=label, color=colour, width=0.8)
        bottom += ys
    ax.set_xlabel("slice")
    ax.set_ylabel("cracks in the slice")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return ReportFigure(
        "cracks",
        "Particle cracks: filled vs empty",
        "Cracks found per slice by the crack heuristic (thin, elongated non-NMC regions inside a particle), "
        "by what fills them.",
        fig,
    )


def montage_figure(run: RunData, max_tiles: int = 8) -> ReportFigure | None:
    tiles = [s for s in run.slices if s.overlay_path is not None]
    if not tiles:
        return None
    from PIL import Image

    chosen = [tiles[round(i)] for i in np.linspace(0, len(tiles) - 1, min(max_tiles, len(tiles)))]
    columns = min(4, len(chosen))
    rows = -(-len(chosen) // columns)
    fig = Figure(figsize=(3 * columns, 2.5 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax, s in zip(axes, chosen, strict=False):
        assert s.overlay_path is not None
        with Image.open(s.overlay_path) as im:
            overlay = im.convert("RGB")
            overlay.thumbnail((480, 480))
        grey = _grey(s.image_paths, overlay.size)
        if grey is not None:
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.asarray(overlay), alpha=0.45)  # the phases over the detector's image
        else:
            ax.imshow(np.asarray(overlay))
        ax.set_title(f"slice {s.index}  ({run.depth_um(s):.2f} µm)", fontsize=9)
        ax.axis("off")
    for ax in axes[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    return ReportFigure(
        "montage",
        "Slices with their segmentation",
        f"{len(chosen)} of {len(tiles)} segmented slices, evenly spaced; colours are the segmentation "
        "overlay the daemon wrote (previews/NNNN_overlay.png).",
        fig,
    )


def _grey(images: dict[str, Path], size: tuple[int, int]) -> np.ndarray | None:
    """The slice's first detector image (CBS, normally), 1-99 % stretched, at the overlay's size."""
    if not images:
        return None
    import tifffile
    from PIL import Image

    path = next(iter(images.values()))
    try:
        image = tifffile.imread(path).astype(np.float32)
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    lo, hi = np.percentile(image, (1, 99))
    stretched = np.clip((image - lo) / max(1.0, hi - lo), 0, 1)
    small = Image.fromarray((stretched * 255).astype(np.uint8)).resize(size)
    return np.asarray(small, dtype=np.float32) / 255


def pore_size_figure(metrics: VolumeMetrics) -> ReportFigure | None:
    sizes = metrics.pore_sizes
    if sizes is None:
        return None
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    widths = np.diff([0.0, *sizes.diameters_um]) * 0.8
    ax.bar(sizes.diameters_um, sizes.volume_fraction, width=widths, color="#1f77b4")
    ax.axvline(sizes.d50_um, color="#d62728", linestyle="--", label=f"d50 = {sizes.d50_um:.2f} µm")
    ax.set_xlabel("local pore diameter (µm)")
    ax.set_ylabel("share of pore volume")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ReportFigure(
        "pore-sizes",
        "Pore size distribution",
        "Volume-weighted local thickness of the pore space (largest inscribed ball covering each voxel).",
        fig,
    )


def timeline_figure(run: RunData) -> ReportFigure | None:
    if not run.steps:
        return None
    t0 = min(s.started for s in run.steps)
    t_end = max([s.completed or s.started for s in run.steps] + [e.time for e in run.events])
    unit, per = ("s", 1.0) if t_end - t0 < 120 else ("min", 60.0)
    names = list(dict.fromkeys(s.step for s in run.steps))
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.6))
    ax = fig.subplots()
    for row, name in enumerate(names):
        spans = [
            ((s.started - t0) / per, max(1e-4, ((s.completed or s.started) - s.started) / per))
            for s in run.steps
            if s.step == name
        ]
        failed = [s for s in run.steps if s.step == name and s.error]
        ax.broken_barh(spans, (row - 0.35, 0.7), color="#1f77b4")
        for s in failed:
            ax.plot((s.started - t0) / per, row, marker="x", color="#d62728", markersize=8)
    seen: set[str] = set()
    for event in run.events:
        colour = TIMELINE_EVENTS.get(event.type)
        if colour is None:
            continue
        label = None if event.type in seen else event.type
        seen.add(event.type)
        ax.axvline((event.time - t0) / per, color=colour, linestyle=":", label=label)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"{'seconds' if unit == 's' else 'minutes'} since the first step (wall clock)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    if seen:
        ax.legend(fontsize=8, loc="lower right")
    return ReportFigure(
        "timeline",
        "Timeline",
        "Every journaled step as a bar (a cross marks a failed step); pauses, suspends, faults, alerts and "
        "adaptive decisions as dotted lines.",
        fig,
    )


def all_figures(run: RunData, volume: VolumeMetrics | None) -> list[ReportFigure]:
    figures = [
        timeline_figure(run),
        montage_figure(run),
        fractions_figure(run),
        crack_figure(run),
        pore_size_figure(volume) if volume is not None else None,
    ]
    return [f for f in figures if f is not None]
