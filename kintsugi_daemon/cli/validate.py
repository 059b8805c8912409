"""`kintsugi validate RECIPE`: check a recipe and say what the run will do, without the instrument."""

from __future__ import annotations

import argparse
from pathlib import Path

from kintsugi_daemon.adapt import LAG, enabled
from kintsugi_daemon.config import load_recipe
from kintsugi_daemon.estimate import estimate_run

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("validate", help="check a recipe; print slices, ETA and disk needed")
    p.add_argument("recipe", type=Path)
    p.set_defaults(handler=_main)


def _hms(seconds: float) -> str:
    h, rem = divmod(round(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s"


def _main(args: argparse.Namespace) -> int:
    recipe, _ = load_recipe(args.recipe)  # ConfigError (a ValueError) exits 2 with the key named
    est = estimate_run(recipe)
    run, img = recipe.run, recipe.imaging
    print(f"recipe {args.recipe}: OK")
    print(f"  run               {run.name} ({run.geometry.replace('_', '-')})")
    print(
        f"  slices            {est.slices} x {run.slice_thickness_m * 1e9:.1f} nm = "
        f"{est.slices * run.slice_thickness_m * 1e6:.2f} um"
    )
    print(
        f"  imaging           {', '.join(d.upper() for d in img.detectors)} "
        f"{img.width_px}x{img.height_px} px, "
        f"{img.pixel_size_m * 1e9:.1f} nm, {img.dwell_s * 1e6:.2f} us, {img.voltage_v / 1e3:.1f} kV, "
        f"{img.current_a * 1e9:.2f} nA"
    )
    pt = recipe.pt
    print(
        "  Pt                "
        + (
            f"{pt.thickness_m * 1e9:.0f} nm ({pt.beam} beam) every {pt.every_slices} slice(s)"
            if pt.every_slices
            else "none"
        )
    )
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in est.breakdown_s.items())
    print(f"  per slice         {est.seconds_per_slice:.1f} s ({parts})")
    print(f"  ETA               {_hms(est.total_s)}")
    print(
        f"  disk needed       {est.total_bytes / 1e9:.2f} GB ({est.bytes_per_slice / 1e6:.1f} MB per slice)"
    )
    seg = recipe.segmentation
    print(f"  segmentation      {'model ' + seg.model if seg.enabled else 'off'}")
    names = enabled(recipe)
    print(
        f"  adapt             {recipe.adapt.policy}"
        + (": " + ", ".join(f"{n} (lag {LAG[n]})" for n in names) if names else "")
    )
    return 0
