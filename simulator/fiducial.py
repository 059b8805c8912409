"""The drift-correction fiducial: a mark milled once through the Pt cap beside the region, along the
milling direction, so every slice shows its cross-section at the same place on the face.

The mark is an X inside a square frame (trenches in bright Pt-C): sharp corners in both directions give
the phase correlation a well-defined peak. It lives in the face-plane frame of the field-of-view origin
(`SimulatedDualBeam._origin_m`), so in the image it moves only with drift, beam shift and stage moves,
which is what the daemon measures. It is painted onto the rendered images after the specimen (a feature
of the cap, not of the electrode): grey levels from the image's own range, the image's own noise level,
the pixels labelled 255 (`outside`) so metrics ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Fiducial", "paint_fiducial"]

TRENCH_FRACTION = 0.12  # trench width as a fraction of the mark's size
FRAME_FRACTION = 0.08
SUPERSAMPLE = 3


@dataclass(frozen=True)
class Fiducial:
    x_m: float  # centre, in the frame of the field-of-view origin
    y_m: float
    size_m: float


def _pattern(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """1 on Pt-C, 0 in the milled trenches; u, v in metres from the centre."""
    half = size / 2.0
    inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    w = TRENCH_FRACTION * size / 2.0
    cross = (np.abs(u - v) / np.sqrt(2.0) < w) | (np.abs(u + v) / np.sqrt(2.0) < w)
    frame_in = half - FRAME_FRACTION * size
    frame = inside & ((np.abs(u) > frame_in) | (np.abs(v) > frame_in))
    return np.where(inside & (cross | frame), 0.0, 1.0)


def paint_fiducial(
    images: dict[str, np.ndarray],
    labels: np.ndarray,
    fiducial: Fiducial,
    origin_m: tuple[float, float],
    pixel_size_m: float,
    y_scale: float,
    rng: np.random.Generator,
) -> None:
    """Paint the mark (plus a margin of plain cap) into each image in place; label it 255.

    `y_scale` is the image's foreshortening of face-plane y (1 / sin 52 deg per pixel in cross-section:
    the renderer's sampling), so the mark lands where the renderer would put the same face point."""
    h, w = labels.shape
    margin = 0.25 * fiducial.size_m
    half = fiducial.size_m / 2.0 + margin
    cx = (fiducial.x_m - origin_m[0]) / pixel_size_m
    cy = (fiducial.y_m - origin_m[1]) / (pixel_size_m * y_scale)
    rx, ry = half / pixel_size_m, half / (pixel_size_m * y_scale)
    c0, c1 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, w)
    r0, r1 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, h)
    if c0 >= c1 or r0 >= r1:
        return  # drifted out of view: the daemon's match score will say so
    s = SUPERSAMPLE
    cols = c0 + (np.arange((c1 - c0) * s) + 0.5) / s
    rows = r0 + (np.arange((r1 - r0) * s) + 0.5) / s
    u = (cols[None, :] - cx) * pixel_size_m
    v = (rows[:, None] - cy) * pixel_size_m * y_scale
    fine = _pattern(u, v, fiducial.size_m)
    cover = fine.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    cover = ndi.gaussian_filter(cover, 0.7)  # the probe
    labels[r0:r1, c0:c1] = 255
    for name, img in images.items():
        lo, hi = np.percentile(img, [5, 95])
        # The image's own noise (a Laplacian residual, as the daemon measures it) keeps the mark honest.
        resid = ndi.convolve(img[: min(h, 256), : min(w, 256)].astype(np.float64), _LAPLACE)
        sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) / 6.0
        grey = lo + (hi - lo) * (0.15 + 0.85 * cover) + rng.normal(0.0, sigma, cover.shape)
        images[name][r0:r1, c0:c1] = np.clip(grey, 0, 65535).astype(img.dtype)


_LAPLACE = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
