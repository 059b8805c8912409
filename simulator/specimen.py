"""The simulated specimen: a porous NMC cathode on an Al collector as a uint8 volume of `Material` codes.

Recipe (DOMAIN.md "Sample model"):
- polydisperse NMC spheres (lognormal diameters) packed by a soft-sphere relaxation in a box larger than
  the volume, so the volume reads as a cut-out of a bigger electrode;
- intergranular cracks in a fraction of the particles: bands 1.5-4 voxels wide along the Voronoi faces
  between a few grain seeds; per particle either all open (reaching the surface, some CBD-filled) or all
  closed (kept inside 0.8 R);
- CBD as an excursion set of score = blur(solid indicator) + w * smoothed noise on a coarse grid,
  trilinearly upsampled, so it gathers at necks and on the collector;
- the rest of the electrode is pore; the collector fills the bottom rows (cross-section) or the far end of
  axis 0 (planar) with a slightly rough interface.

Fractions are hit by construction: a strided sample of the very same fields picks the particle radius
scale (NMC target, cracks included) and the CBD threshold (CBD-domain target) before the full-resolution
pass renders the volume slab by slab along axis 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from kintsugi_daemon.service.atomic import write_atomic, write_json_atomic
from simulator.cracks import make_cracks
from simulator.materials import Material
from simulator.particles import add_fines, pack_particles, visible_particles
from simulator.phases import render_slabs, solve_fields
from simulator.specimen_grid import F64, I64
from simulator.specimen_params import CBD_NANOPOROSITY, PRESETS, PresetFractions, SpecimenParams

__all__ = [
    "PRESETS",
    "PRESET_TOLERANCE",
    "PresetFractions",
    "PresetMissed",
    "Specimen",
    "SpecimenParams",
    "build_specimen",
    "check_preset",
    "default_cache_dir",
    "fractions_of",
]

log = logging.getLogger(__name__)

PRESET_TOLERANCE = 0.03  # a volume further than this from its preset's fractions is refused


@dataclass(frozen=True, eq=False)
class Specimen:
    params: SpecimenParams
    materials: npt.NDArray[np.uint8]  # (slices, rows, cols); a read-only memmap when cached
    counts: dict[str, int]  # voxels per Material name
    particle_centres_vox: F64 = field(repr=False)  # (N, 3), particles that touch the volume
    particle_radii_vox: F64 = field(repr=False)

    def fractions(self) -> dict[str, float]:
        return fractions_of(self.counts)


def fractions_of(c: dict[str, int]) -> dict[str, float]:
    """nmc, cbd (domain incl. CBD-filled cracks), pore (resolved voids incl. empty cracks), crack (empty +
    CBD-filled) and porosity over the electrode (no collector, no vacuum); collector over the volume."""
    total = sum(c.values())
    electrode = max(1, total - c["AL"] - c["VACUUM"])
    cbd = (c["CBD"] + c["CBD_CRACK"]) / electrode
    pore = (c["PORE"] + c["CRACK"]) / electrode
    return {
        "nmc": c["NMC"] / electrode,
        "cbd": cbd,
        "pore": pore,
        "porosity": pore + CBD_NANOPOROSITY * cbd,
        "crack": (c["CRACK"] + c["CBD_CRACK"]) / electrode,
        "collector": c["AL"] / max(1, total),
    }


class PresetMissed(ValueError):
    """The built volume's fractions are further than PRESET_TOLERANCE from its preset's."""


def check_preset(params: SpecimenParams, counts: dict[str, int]) -> None:
    """Raise PresetMissed naming every fraction off its target by more than PRESET_TOLERANCE."""
    got = fractions_of(counts)
    want = params.targets
    misses = [
        f"{name} {got[name]:.3f} (target {target:.2f})"
        for name, target in (("nmc", want.nmc), ("cbd", want.cbd), ("porosity", want.porosity))
        if abs(got[name] - target) > PRESET_TOLERANCE
    ]
    if misses:
        raise PresetMissed(
            f"specimen preset {params.preset} seed {params.seed} shape {params.shape} misses its volume "
            f"fractions by more than {PRESET_TOLERANCE}: {', '.join(misses)}; a larger volume or another "
            "seed packs closer to the preset"
        )


def default_cache_dir() -> Path:
    env = os.environ.get("KINTSUGI_SIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kintsugi-sim"


def build_specimen(
    params: SpecimenParams,
    cache_dir: Path | None = None,
    progress: Callable[[float], None] | None = None,
) -> Specimen:
    """Build (or load from `cache_dir`) the specimen for `params`; same params -> identical array.

    With `cache_dir` None nothing touches the disk. A cached volume is checked (shape, dtype, size,
    CRC32 against its sidecar JSON) and rebuilt when anything is off.
    """
    report = progress or (lambda _f: None)
    if cache_dir is not None:
        cached = _load_cached(params, cache_dir)
        if cached is not None:
            report(1.0)
            return cached
    ss = np.random.SeedSequence([params.seed, 0x6B696E74])
    rng_pack, rng_crack, rng_field, rng_fines = (np.random.default_rng(s) for s in ss.spawn(4))
    parts = pack_particles(params, rng_pack, params.targets.nmc)
    report(0.05)
    cracks = make_cracks(params, rng_crack, parts)
    parts = add_fines(params, rng_fines, parts)
    report(0.1)
    fields = solve_fields(params, rng_field, parts, cracks)
    report(0.2)
    centres, radii = visible_particles(params, parts, fields.scale)
    n0 = params.shape[0]
    counts = np.zeros(len(Material), dtype=np.int64)

    def slabs() -> Iterator[npt.NDArray[np.uint8]]:
        done = 0
        for mat in render_slabs(params, parts, cracks, fields):
            counts[:] += np.bincount(mat.ravel(), minlength=len(Material))[: len(Material)]
            done += mat.shape[0]
            report(min(0.99, 0.2 + 0.8 * done / n0))
            yield mat

    if cache_dir is None:
        materials = np.empty(params.shape, dtype=np.uint8)
        z = 0
        for mat in slabs():
            materials[z : z + mat.shape[0]] = mat
            z += mat.shape[0]
        check_preset(params, _count_dict(counts))
        report(1.0)
        return Specimen(params, materials, _count_dict(counts), centres, radii)

    cache_dir.mkdir(parents=True, exist_ok=True)
    npy, meta = _cache_paths(params, cache_dir)
    crc = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal crc
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(fh, {**header, "shape": params.shape})
        for mat in slabs():
            crc = zlib.crc32(mat.data, crc)
            fh.write(mat.data)
        check_preset(params, _count_dict(counts))  # raising here leaves no cache file behind

    write_atomic(npy, write)
    meta_doc: dict[str, Any] = {
        "key": params.cache_key(),
        "params": dataclasses.asdict(params),
        "shape": list(params.shape),
        "crc32": crc,
        "counts": _count_dict(counts),
        "scale": fields.scale,
        "particle_centres_vox": np.round(centres, 3).tolist(),
        "particle_radii_vox": np.round(radii, 3).tolist(),
    }
    write_json_atomic(meta, meta_doc)
    loaded = _load_cached(params, cache_dir, verify_crc=False)  # just written: skip re-reading 400 MB
    if loaded is None:
        raise OSError(f"specimen cache {npy} unreadable right after writing it")
    report(1.0)
    return loaded


def _count_dict(counts: I64) -> dict[str, int]:
    return {m.name: int(counts[m.value]) for m in Material}


def _cache_paths(p: SpecimenParams, cache_dir: Path) -> tuple[Path, Path]:
    stem = f"specimen-{p.cache_key()}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _load_cached(p: SpecimenParams, cache_dir: Path, verify_crc: bool = True) -> Specimen | None:
    npy, meta = _cache_paths(p, cache_dir)
    if not (npy.exists() and meta.exists()):
        return None
    try:
        doc = json.loads(meta.read_text())
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        ok = (
            doc.get("key") == p.cache_key()
            and arr.dtype == np.uint8
            and arr.shape == p.shape
            and arr.flags.c_contiguous
            and npy.stat().st_size == arr.offset + arr.nbytes
            and (not verify_crc or zlib.crc32(arr) == doc["crc32"])
        )
        if ok:
            counts = {str(k): int(v) for k, v in doc["counts"].items()}
            centres = np.asarray(doc["particle_centres_vox"], dtype=np.float64).reshape(-1, 3)
            radii = np.asarray(doc["particle_radii_vox"], dtype=np.float64)
            return Specimen(p, arr, counts, centres, radii)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as exc:
        log.warning("specimen cache %s unreadable (%s); rebuilding", npy, exc)
        return None
    log.warning("specimen cache %s failed its checks; rebuilding", npy)
    return None
