"""`kintsugi-sim dataset`: one specimen sectioned twice, with and without Pt infiltration.

Both variants run the daemon's fixed schedule (its own requests and imaging) on the same specimen with the
same random streams, so slice i of `with-pt/` and `without-pt/` show the same plane; only the Pt (and so
pore contrast) differs. With `partial=True` a third variant `partial-pt/` deposits as `with-pt/` but the
precursor gets into only PARTIAL_COVERAGE of the face area (patches a few um across stay empty): a
partial infiltration, filled and empty pores side by side (what a model must see to notice it). Labels
are the canonical classes; pixels outside the specimen (the Pt cap, vacuum) are 255 (`outside_label`).
Every file is written atomically and the manifest last, so a folder with a `dataset.json` is complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kintsugi_daemon.config import Recipe
from kintsugi_daemon.drivers.base import Acquisition, DualBeam
from kintsugi_daemon.service.atomic import write_json_atomic, write_tiff_atomic
from kintsugi_daemon.states import steps
from simulator.factory import RunSize, make_simulator
from simulator.materials import CANONICAL_CLASSES, OUTSIDE_LABEL

__all__ = ["PARTIAL_COVERAGE", "PARTIAL_VARIANT", "VARIANTS", "export_dataset"]

VARIANTS = ("with-pt", "without-pt")
PARTIAL_VARIANT = "partial-pt"
PARTIAL_COVERAGE = 0.5
# The field of view's milled area: generous, so every FOV fits (it only sets the simulated mill time).
ROI = {"width_m": 65e-6, "height_m": 55e-6}


@dataclass(frozen=True)
class SliceOutcome:
    index: int
    acquisition: Acquisition


async def fixed_schedule(instrument: DualBeam, recipe: Recipe) -> AsyncIterator[SliceOutcome]:
    """The recipe's slices with the daemon's own requests and imaging, without journal or state machine.
    Each slice is yielded as soon as its images are in."""
    for index in range(recipe.run.total_slices):
        planned = steps.steps_for_slice(recipe, index)
        if "deposit_pt" in planned:
            await instrument.deposit_pt(steps.deposit_request(recipe))
        await instrument.mill(steps.mill_request(recipe, recipe.run.slice_thickness_m))
        if "polish" in planned:
            await instrument.polish(steps.polish_request(recipe))
        yield SliceOutcome(index, await steps.image(instrument, recipe))


def _recipe(
    slices: int,
    width_px: int,
    height_px: int,
    pixel_size_m: float,
    geometry: Literal["cross_section", "planar"],
    *,
    pt_every: int,
    imaging: dict[str, float] | None = None,
) -> Recipe:
    return Recipe.model_validate(
        {
            "run": {
                "name": "kintsugi-sim dataset",
                "geometry": geometry,
                "slices": slices,
                "slice_thickness_m": 40e-9,
            },
            "roi": ROI,
            "pt": {"every_slices": pt_every},
            "imaging": {
                "width_px": width_px,
                "height_px": height_px,
                "pixel_size_m": pixel_size_m,
                **(imaging or {}),
            },
            "segmentation": {"enabled": False},
        }
    )


async def _export_variant(
    out: Path,
    recipe: Recipe,
    size: RunSize,
    *,
    preset: str,
    seed: int,
    geometry: Literal["cross_section", "planar"],
    cache_dir: Path | None,
    progress: Callable[[str], None],
    coverage: float = 1.0,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete folder: drop a stale one before the first file is overwritten.
    (out / "dataset.json").unlink(missing_ok=True)
    # No thermal drift: the with-Pt variant spends more instrument time (deposits) and would drift apart.
    sim = make_simulator(
        size,
        preset=preset,
        seed=seed,
        geometry=geometry,
        time_scale=0.0,
        cache_dir=cache_dir,
        infiltration_coverage=coverage,
        thermal_drift=False,
    )
    slices: list[dict[str, Any]] = []
    async for outcome in fixed_schedule(sim, recipe):
        i = outcome.index
        images: dict[str, str] = {}
        meta = outcome.acquisition.metadata.model_dump(mode="json")
        for name, image in outcome.acquisition.images.items():
            fname = f"{i:04d}_{name}.tif"
            write_tiff_atomic(out / fname, image, {"detector": name, **meta})
            images[name] = fname
        assert sim.last_labels is not None  # acquire always leaves the aligned ground truth
        write_tiff_atomic(out / f"{i:04d}_labels.tif", sim.last_labels, {"classes": CANONICAL_CLASSES})
        slices.append(
            {
                "index": i,
                "images": images,
                "labels": f"{i:04d}_labels.tif",
                "face_position_m": outcome.acquisition.metadata.face_position_m,
            }
        )
        progress(f"{out.name}: slice {i + 1}/{recipe.run.total_slices}")
    img = recipe.imaging
    manifest = {
        "detectors": list(img.detectors),
        "classes": CANONICAL_CLASSES,
        "outside_label": OUTSIDE_LABEL,
        "pixel_size_m": img.pixel_size_m,
        "slice_thickness_m": recipe.run.slice_thickness_m,
        "width_px": img.width_px,
        "height_px": img.height_px,
        "preset": preset,
        "seed": seed,
        "geometry": geometry,
        "pt_infiltration": recipe.pt.every_slices > 0,
        "pt_coverage": coverage if recipe.pt.every_slices > 0 else 0.0,
        "imaging": {"voltage_v": img.voltage_v, "current_a": img.current_a, "dwell_s": img.dwell_s},
        "generator": "kintsugi-sim dataset",
        "slices": slices,
    }
    write_json_atomic(out / "dataset.json", manifest)
    return manifest


def export_dataset(
    out: Path,
    *,
    slices: int = 16,
    seed: int = 0,
    preset: str = "96:2:2",
    width_px: int = 512,
    height_px: int = 384,
    pixel_size_m: float = 4.05e-8,
    geometry: Literal["cross_section", "planar"] = "cross_section",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    partial: bool = False,
    imaging: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """`imaging` overrides recipe imaging settings (dwell_s, voltage_v, current_a) for every variant."""
    recipe = _recipe(slices, width_px, height_px, pixel_size_m, geometry, pt_every=1, imaging=imaging)
    size = RunSize(
        width_px=width_px,
        height_px=height_px,
        pixel_size_m=pixel_size_m,
        slices=slices,
        slice_thickness_m=recipe.run.slice_thickness_m,
    )
    manifests = {}
    for variant in (*VARIANTS, PARTIAL_VARIANT) if partial else VARIANTS:
        variant_recipe = (
            recipe
            if variant != "without-pt"
            else _recipe(slices, width_px, height_px, pixel_size_m, geometry, pt_every=0, imaging=imaging)
        )
        manifests[variant] = asyncio.run(
            _export_variant(
                out / variant,
                variant_recipe,
                size,
                preset=preset,
                seed=seed,
                geometry=geometry,
                cache_dir=cache_dir,
                progress=progress,
                coverage=PARTIAL_COVERAGE if variant == PARTIAL_VARIANT else 1.0,
            )
        )
    return manifests
