"""Pt infiltration from the exposed face (DOMAIN.md, "Pt infiltration (choice)").

The precursor enters the void space (PORE, empty CRACK) open to the milled face and decomposes there,
down to the infiltration depth, passing only throats wide enough for a probe of the throat radius.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from simulator.materials import Material

__all__ = ["infiltrate", "infiltration_factor", "ragged_front"]

_MAX_GEODESIC_STEPS = 3
_FACE_6 = ndimage.generate_binary_structure(3, 1)


def infiltrate(
    materials: npt.NDArray[np.uint8], face_index: int, depth_vox: int, throat_radius_vox: float
) -> npt.NDArray[np.bool_]:
    """Pt mask over the slab `materials[face_index : face_index + depth_vox]` (plane 0 is the face).

    True where an empty void voxel (PORE or CRACK) is reached from the face through void, passing only
    throats at least 2 * throat_radius_vox wide; CBD, NMC, AL and closed voids never get Pt.

    Approximation (documented choice, exact for axis-aligned throats):
    - the probe is an axis-aligned cube of side m = ceil(2 * throat_radius_vox) voxels instead of a
      ball, so a slit passes when it is >= m voxels wide along an axis; oblique throats need up to
      sqrt(3) x more width (conservative: less Pt, never more);
    - passable space = void eroded by that cube (the gas in front of the face counts as void, and so do
      voxels past the lateral edges of the volume); its 6-connected components touching the face plane
      are flooded; the filled region is the union of cubes at the flooded positions (a morphological
      opening restricted to the reachable part), grown by min(m - 1, 3) geodesic 6-neighbour steps inside the
      void to reach the corners the cube cannot (so Pt also enters crack mouths by up to 3 voxels);
    - the connection must run inside the slab: a path that leaves it deeper than depth_vox and returns
      is not followed (the precursor does not get that far).
    throat_radius_vox <= 0.5 means plain 6-connectivity of the void.
    """
    if face_index < 0 or face_index >= materials.shape[0] or depth_vox <= 0:
        raise ValueError(f"face_index {face_index} / depth_vox {depth_vox} outside the volume")
    slab = np.asarray(materials[face_index : face_index + depth_vox])
    void = slab == Material.PORE
    void |= slab == Material.CRACK
    m = max(1, math.ceil(2.0 * throat_radius_vox - 1e-9))
    passable = void if m == 1 else _erode_box(void, m)
    labels, n = ndimage.label(passable, structure=_FACE_6)
    on_face = np.zeros(n + 1, dtype=bool)
    on_face[labels[0]] = True
    on_face[0] = False
    k = int(np.count_nonzero(on_face))
    if on_face[1 : k + 1].all():
        # label() numbers components in raster order, so the face components are 1..k: two cheap
        # compares instead of a gather through a lookup table.
        reached: npt.NDArray[np.bool_] = labels <= k
        reached &= passable
    else:
        reached = on_face[labels]
    del labels
    if m == 1:
        return reached
    filled = _dilate_box(reached, m)
    filled &= void
    for _ in range(min(m - 1, _MAX_GEODESIC_STEPS)):
        filled = _geodesic_step(filled, void)
    return filled


def infiltration_factor(depth_m: float, seed: int) -> float:
    """How far the precursor gets at this depth of the run, as a fraction of its nominal reach (0.3-1).

    Calendering leaves denser bands with narrower throats along the milling direction (choice: a smooth
    random profile with 1-4 um bands), so no single fixed deposition interval is both cheap and
    sufficient everywhere: where it is dense, Pt reaches a third as far.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1F17]))
    periods = rng.uniform(1.0e-6, 4.0e-6, 4)
    phases = rng.uniform(0.0, 2.0 * math.pi, 4)
    weights = rng.uniform(0.5, 1.0, 4)
    wave = float(np.sum(weights * np.sin(2.0 * math.pi * depth_m / periods + phases)) / np.sum(weights))
    # Squash towards the dense end: bands are narrower than the open stretches between them.
    open_ = 0.5 * (1.0 + math.tanh(2.5 * wave + 0.8))
    return 0.3 + 0.7 * open_


def ragged_front(mask: npt.NDArray[np.bool_], seed: int, face_index: int) -> npt.NDArray[np.bool_]:
    """The precursor does not stop on a plane: how far it gets varies across the face (longer paths,
    narrower throats), from 55 % to 100 % of the reach over a few microns (choice). So unfilled pores
    appear over a few slices as the face nears the front, not all at once: the warning the Pt policy
    can act on."""
    depth, rows, cols = mask.shape
    rng = np.random.default_rng(np.random.SeedSequence([seed, face_index, 0xF207]))
    field = ndimage.gaussian_filter(rng.standard_normal((rows, cols)), sigma=25.0, mode="wrap")
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-12)
    limit = depth * (0.55 + 0.45 * field)  # planes reached at each (row, col)
    planes = np.arange(depth, dtype=np.float32)[:, None, None]
    out: npt.NDArray[np.bool_] = mask & (planes < limit[None, :, :])
    return out


def _erode_box(void: npt.NDArray[np.bool_], m: int) -> npt.NDArray[np.bool_]:
    """Anchor positions of an m-cube that fits in the void. Along axis 0 the cube reaches back towards
    the face (into the open gas), along axes 1 and 2 forward; out-of-volume voxels count as void."""
    out = void.copy()
    for k in range(1, m):
        out[k:] &= void[:-k]  # void[z - k]; before the face it is gas
    for axis in (1, 2):
        src = out.copy()
        for k in range(1, m):
            dst = [slice(None)] * 3
            s = [slice(None)] * 3
            dst[axis], s[axis] = slice(0, -k), slice(k, None)
            out[tuple(dst)] &= src[tuple(s)]
    return out


def _dilate_box(anchors: npt.NDArray[np.bool_], m: int) -> npt.NDArray[np.bool_]:
    """Union of the m-cubes placed at the anchors (the transpose of `_erode_box`)."""
    out = anchors.copy()
    for k in range(1, m):
        out[:-k] |= anchors[k:]
    for axis in (1, 2):
        src = out.copy()
        for k in range(1, m):
            dst = [slice(None)] * 3
            s = [slice(None)] * 3
            dst[axis], s[axis] = slice(k, None), slice(0, -k)
            out[tuple(dst)] |= src[tuple(s)]
    return out


def _geodesic_step(region: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    out = region.copy()
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        out[tuple(lo)] |= region[tuple(hi)]
        out[tuple(hi)] |= region[tuple(lo)]
    out &= mask
    return out
