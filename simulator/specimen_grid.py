"""Sampling grids: the same field code evaluates a strided sample, a coarse grid or a full-res slab, and
the particle field (distance to the nearest particle centre in radii) on any of them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from simulator.materials import Material

__all__ = [
    "CLOSED_LIMIT",
    "COARSE",
    "F32",
    "F64",
    "I64",
    "KIND_CODE",
    "SCALE_MAX",
    "Axis",
    "Cracks",
    "Grid",
    "Particles",
    "grid_shape",
    "interp3",
    "interp_axis",
    "particle_field",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Axis:
    start: int
    step: int
    num: int

    def coords(self) -> F64:
        return self.start + self.step * np.arange(self.num, dtype=np.float64)

    def index_range(self, lo: float, hi: float) -> tuple[int, int]:
        """Indices whose coordinate lies in [lo, hi]."""
        i0 = max(0, math.ceil((lo - self.start) / self.step))
        i1 = min(self.num, math.floor((hi - self.start) / self.step) + 1)
        return i0, max(i0, i1)

    @property
    def last(self) -> int:
        return self.start + self.step * (self.num - 1)


Grid = tuple[Axis, Axis, Axis]


def grid_shape(grid: Grid) -> tuple[int, int, int]:
    return (grid[0].num, grid[1].num, grid[2].num)


@dataclass
class Particles:
    centres: F64  # (N, 3) voxel coordinates
    radii: F64  # nominal radii in voxels; rendered radius = radii * scale


@dataclass
class Cracks:
    """Sparse crack voxels: flat index into the full volume, sorted; owning particle; kind."""

    flat: I64
    pid: npt.NDArray[np.int32]
    kind: npt.NDArray[np.uint8]  # 0 open empty, 1 open CBD-filled, 2 closed


KIND_CODE = np.array([Material.CRACK, Material.CBD_CRACK, Material.CRACK], dtype=np.uint8)
CLOSED_LIMIT = 0.8  # closed cracks stay inside this fraction of the radius
SCALE_MAX = 1.3  # the radius scale solved for the NMC target stays below this
COARSE = 4  # coarse grid spacing (voxels) of the CBD and collector fields


def particle_field(grid: Grid, parts: Particles, extent: float) -> tuple[F32, npt.NDArray[np.int32]]:
    """g2 = min over particles of (|x - c| / r)^2 and its argmin, evaluated within extent * r."""
    shape = grid_shape(grid)
    g2 = np.full(shape, np.inf, dtype=np.float32)
    label = np.full(shape, -1, dtype=np.int32)
    coords = [a.coords() for a in grid]
    reach = parts.radii * extent
    lo = np.array([a.start for a in grid], dtype=np.float64)
    hi = np.array([a.last for a in grid], dtype=np.float64)
    hit = np.all((parts.centres + reach[:, None] >= lo) & (parts.centres - reach[:, None] <= hi), axis=1)
    for p in np.flatnonzero(hit):
        c, r, e = parts.centres[p], parts.radii[p], reach[p]
        (z0, z1), (y0, y1), (x0, x1) = (grid[k].index_range(c[k] - e, c[k] + e) for k in range(3))
        if z0 == z1 or y0 == y1 or x0 == x1:
            continue
        dz = (((coords[0][z0:z1] - c[0]) / r) ** 2).astype(np.float32)
        dy = (((coords[1][y0:y1] - c[1]) / r) ** 2).astype(np.float32)
        dx = (((coords[2][x0:x1] - c[2]) / r) ** 2).astype(np.float32)
        rel2 = (dz[:, None] + dy[None, :])[:, :, None] + dx[None, None, :]
        gv = g2[z0:z1, y0:y1, x0:x1]
        closer = rel2 < gv
        np.copyto(gv, rel2, where=closer)
        np.copyto(label[z0:z1, y0:y1, x0:x1], np.int32(p), where=closer)
    return g2, label


def interp_axis(a: F32, coords: F64, margin: int, axis: int) -> F32:
    """Linear interpolation of a coarse-node array (node j at voxel (j - margin) * COARSE) along axis."""
    u = coords / COARSE + margin
    i0 = np.clip(np.floor(u).astype(np.intp), 0, a.shape[axis] - 2)
    w = np.clip(u - i0, 0.0, 1.0).astype(np.float32)
    bshape = [1] * a.ndim
    bshape[axis] = len(coords)
    w = w.reshape(bshape)
    lo = np.take(a, i0, axis=axis)
    hi = np.take(a, i0 + 1, axis=axis)
    hi -= lo
    hi *= w
    lo += hi
    return lo


def interp3(a: F32, grid: Grid, margin: int) -> F32:
    out = a
    for axis in range(3):
        out = interp_axis(out, grid[axis].coords(), margin, axis)
    return out
