"""Side-by-side images for the README: one simulated cross-section with Pt, with a partial infiltration
and without Pt (CBS and TLD), from a `kintsugi-sim dataset --partial` folder.

    kintsugi-sim dataset --out build/docs-data --slices 1 --seed 7 --preset 94:3:3 \\
        --width-px 1024 --height-px 768 --partial
    python scripts/docs_images.py build/docs-data docs/

Each panel is the 16-bit image as written, shown between its 0.5 and 99.5 percentiles (no other
processing; the left 640 columns); a label strip shows the ground truth (pore black, unfilled pore red,
NMC grey, CBD green, collector blue, outside white).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio

CROP_COLS = 640  # left part of each 1024-px frame: full resolution, a smaller file
COLOURS = {0: (0, 0, 0), 1: (220, 40, 40), 2: (150, 150, 150), 3: (60, 170, 80), 4: (60, 90, 200)}


def _grey(path: Path) -> np.ndarray:
    im = tifffile.imread(path).astype(np.float64)
    lo, hi = np.percentile(im, [0.5, 99.5])
    out: np.ndarray = (np.clip((im - lo) / max(hi - lo, 1.0), 0, 1) * 255).astype(np.uint8)
    return np.repeat(out[:, :CROP_COLS, None], 3, axis=2)


def _labels(path: Path) -> np.ndarray:
    lab = tifffile.imread(path)[:, :CROP_COLS]
    rgb = np.full((*lab.shape, 3), 255, np.uint8)
    for value, colour in COLOURS.items():
        rgb[lab == value] = colour
    return rgb


def main(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    variants = ("with-pt", "partial-pt", "without-pt")
    gap = np.full((768, 8, 3), 255, np.uint8)
    for det in ("cbs", "tld"):
        panels = []
        for v in variants:
            panels += [_grey(src / v / f"0000_{det}.tif"), gap]
        skio.imsave(
            out / f"sim-{det}-pt-partial-none.png", np.concatenate(panels[:-1], axis=1), check_contrast=False
        )
    panels = []
    for v in variants:
        panels += [_labels(src / v / "0000_labels.tif"), gap]
    skio.imsave(
        out / "sim-labels-pt-partial-none.png", np.concatenate(panels[:-1], axis=1), check_contrast=False
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
