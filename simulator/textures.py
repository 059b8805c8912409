"""Material textures of the milled face, fixed in specimen coordinates: they stay put between frames and
change smoothly from slice to slice, as the real microstructure does.

- NMC primary grains (DOMAIN.md: 0.2-1 um, tens to hundreds per particle section) show orientation
  (channelling) contrast: a 3-D Voronoi tessellation of seeds jittered on a 0.45 um lattice gives each
  grain a value (grains of about 0.2-0.8 um in section).
  Channelling contrast in BSE is a few percent at 5 kV (Joy, Newbury & Davidson 1982); the ion-induced
  SE image (ICE) shows it far more strongly.
- CBD is carbon black + PVDF with 50-300 nm pores (DOMAIN.md: CBD = solid + its nanopores, ~50 %): a
  two-octave 3-D value noise at 80 and 200 nm cells, ramped around its median.
- Pt-C from the GIS is nanocrystalline Pt in amorphous carbon: a granular texture (+-8 %) and voids
  where the fill is incomplete (a few percent of the deposit in 100-250 nm pockets; voids in EBID/FIB Pt
  fills of narrow openings are well known).
Every field is a lattice of hashed values (an integer hash of lattice coordinates and a salt, so no
random state is kept) interpolated on the image grid. Textures are evaluated on a grid `STEP` times
coarser than the frame and repeated up: at 40 nm pixels that is 80 nm, below the features that matter,
and it keeps the textures inside the render budget.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STEP", "PlaneTexture"]

STEP = 2  # texture grid = every STEP-th image row and column
GRAIN_CELL_M = 0.45e-6
CBD_PORE_CELLS_M = (80e-9, 200e-9)
PT_GRAIN_CELL_M = 60e-9
PT_VOID_CELL_M = 160e-9
PT_VOID_LEVEL = 0.86  # value-noise level above which the Pt deposit is void (~3 % of its area)


def _hash(i: np.ndarray, j: np.ndarray, k: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic float32 in [0, 1) per integer triple (broadcasting)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (k.astype(np.int64) * 83492791)
    h = h ^ np.int64((salt * 2654435761) & 0x7FFFFFFF)
    h = ((h ^ (h >> 13)) * 1274126177) & 0x7FFFFFFF
    h = (h ^ (h >> 16)) & 0xFFFFFF
    out: np.ndarray = h.astype(np.float32) * np.float32(1.0 / 16777216.0)
    return out


def _smooth(f: np.ndarray) -> np.ndarray:
    out: np.ndarray = f * f * (3.0 - 2.0 * f)
    return out.astype(np.float32)


class PlaneTexture:
    """Textures on one face plane: `z_m` its depth along the mill axis, `y_m`/`x_m` the specimen
    coordinates of the image rows and columns (metres); results are (len(y_m), len(x_m)) float32."""

    def __init__(self, z_m: float, y_m: np.ndarray, x_m: np.ndarray, seed: int) -> None:
        self.z, self.seed = z_m, seed
        self.full = (len(y_m), len(x_m))
        self.y, self.x = y_m[::STEP], x_m[::STEP]

    def _up(self, coarse: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.repeat(np.repeat(coarse, STEP, axis=0), STEP, axis=1)
        return out[: self.full[0], : self.full[1]]

    def _axis(self, coords: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
        u = coords / cell
        i = np.floor(u)
        return (i - i.min()).astype(np.intp), (u - i).astype(np.float32), int(i.min())

    def noise(self, cell_m: float, salt: int) -> np.ndarray:
        """Trilinear value noise in [0, 1) with smoothstep weights (coarse grid)."""
        a, fy, j0 = self._axis(self.y, cell_m)
        b, fx, k0 = self._axis(self.x, cell_m)
        u = self.z / cell_m
        iz = int(np.floor(u))
        f = u - iz
        fz = f * f * (3.0 - 2.0 * f)
        jj = (j0 + np.arange(a.max() + 2))[None, :, None]
        kk = (k0 + np.arange(b.max() + 2))[None, None, :]
        table = _hash(np.array([iz, iz + 1])[:, None, None], jj, kk, self.seed * 1009 + salt)
        layer = (1.0 - fz) * table[0] + fz * table[1]
        fy, fx = _smooth(fy)[:, None], _smooth(fx)[None, :]
        rows0, rows1 = layer.take(a, axis=0), layer.take(a + 1, axis=0)
        top = rows0.take(b, axis=1) * (1 - fx) + rows0.take(b + 1, axis=1) * fx
        bottom = rows1.take(b, axis=1) * (1 - fx) + rows1.take(b + 1, axis=1) * fx
        return self._up((top * (1 - fy) + bottom * fy).astype(np.float32))

    def grains(self, salt: int, cell_m: float = GRAIN_CELL_M) -> np.ndarray:
        """A value in [-1, 1) per primary grain: 3-D Voronoi of seeds jittered anywhere in their lattice
        cell, nearest among the 3 x 3 cells around the point in the two lattice layers nearest in z."""
        a, fy, j0 = self._axis(self.y, cell_m)
        b, fx, k0 = self._axis(self.x, cell_m)
        u = self.z / cell_m - 0.5
        iz = int(np.floor(u))
        fz = float(u - iz) + 0.5  # the point's z within the lower layer's cell coordinates
        jj = (j0 - 1 + np.arange(a.max() + 3))[None, :, None]
        kk = (k0 - 1 + np.arange(b.max() + 3))[None, None, :]
        zz = np.array([iz, iz + 1])[:, None, None]
        s = self.seed * 1009 + salt
        jz, jy, jx, val = (_hash(zz, jj, kk, s + n) for n in range(4))
        best = np.full((len(a), len(b)), np.inf, np.float32)
        value = np.zeros_like(best)
        fy2, fx2 = fy[:, None], fx[None, :]
        for dz in (0, 1):
            dzz = ((fz - dz - jz) ** 2).astype(np.float32)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ra, cb = a + 1 + dy, b + 1 + dx

                    def at(t: np.ndarray, ra: np.ndarray = ra, cb: np.ndarray = cb) -> np.ndarray:
                        out: np.ndarray = t.take(ra, axis=0).take(cb, axis=1)
                        return out

                    d = at(dzz[dz]) + (fy2 - dy - at(jy[dz])) ** 2
                    d += (fx2 - dx - at(jx[dz])) ** 2
                    closer = d < best
                    np.copyto(best, d, where=closer)
                    np.copyto(value, at(val[dz]), where=closer)
        return self._up(value * np.float32(2.0) - np.float32(1.0))

    def cbd_pores(self) -> np.ndarray:
        """Share of each CBD pixel that is nanopore (0..1, about half on average)."""
        n = 0.65 * self.noise(CBD_PORE_CELLS_M[0], 21) + 0.35 * self.noise(CBD_PORE_CELLS_M[1], 22)
        out: np.ndarray = np.clip((n - np.float32(0.5)) * np.float32(5.0) + np.float32(0.5), 0.0, 1.0)
        return out

    def pt(self) -> np.ndarray:
        """Multiplicative factor of Pt-C pixels: granular texture, and 0.1 in the voids of the deposit."""
        factor = np.float32(0.92) + np.float32(0.16) * self.noise(PT_GRAIN_CELL_M, 31)
        factor[self.noise(PT_VOID_CELL_M, 32) > np.float32(PT_VOID_LEVEL)] = np.float32(0.1)
        return factor
