"""Colour overlay preview of a segmentation: the detector image with the classes blended over it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from skimage import io as skio

from kintsugi_daemon.inference.contract import CANONICAL_CLASSES

__all__ = ["CLASS_COLOURS", "overlay", "save_overlay"]

# Kintsugi gold for the Pt-filled pores; red flags the pores the Pt did not reach.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "pore": (235, 185, 40),
    "unfilled_pore": (220, 30, 60),
    "active": (60, 110, 210),
    "cbd": (60, 180, 90),
    "collector": (160, 160, 160),
}


def _to_grey8(image: np.ndarray) -> np.ndarray:
    # Percentile stretch: a few Pt-bright or saturated pixels must not wash out the rest of the slice.
    f = image.astype(np.float32)
    lo, hi = np.percentile(f, (0.5, 99.5))
    scaled = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
    return np.asarray(np.clip(scaled * 255, 0, 255).astype(np.uint8))


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the grey image blended with each canonical class's colour."""
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be 2-D and of one shape")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    grey = _to_grey8(image).astype(np.float32)[..., None]
    lut = np.zeros((256, 3), np.float32)
    for name, value in CANONICAL_CLASSES.items():
        lut[value] = CLASS_COLOURS[name]
    colour = lut[labels]
    known = np.isin(labels, list(CANONICAL_CLASSES.values()))[..., None]
    blended = np.where(known, (1 - alpha) * grey + alpha * colour, grey)
    return np.asarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def save_overlay(path: Path, rgb: np.ndarray) -> None:
    """Write the preview as PNG atomically (temp file beside it, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        skio.imsave(tmp, rgb, check_contrast=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
