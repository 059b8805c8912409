"""What decides a simulated specimen: the preset volume fractions and every parameter (the cache key)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

__all__ = ["CBD_NANOPOROSITY", "GENERATOR_VERSION", "PRESETS", "PresetFractions", "SpecimenParams"]

# Bump whenever the generator changes what a given SpecimenParams renders (invalidates caches).
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class PresetFractions:
    """Targets over the electrode region. porosity = resolved pores + cracks + half the CBD domain."""

    porosity: float
    nmc: float
    cbd: float  # CBD domain (solid + ~50% nanopores), CBD-filled cracks included


PRESETS: dict[str, PresetFractions] = {
    "96:2:2": PresetFractions(porosity=0.30, nmc=0.63, cbd=0.14),
    "94:3:3": PresetFractions(porosity=0.35, nmc=0.56, cbd=0.18),
    "90:5:5": PresetFractions(porosity=0.40, nmc=0.47, cbd=0.27),
}

CBD_NANOPOROSITY = 0.5  # share of the CBD domain that is nanopore (counts towards porosity)


@dataclass(frozen=True)
class SpecimenParams:
    """Everything that decides the rendered volume; all of it goes into the cache key."""

    preset: str = "96:2:2"
    seed: int = 0
    shape: tuple[int, int, int] = (200, 1300, 1536)  # (slices along the mill axis, rows, cols)
    voxel_size_m: float = 40e-9
    geometry: Literal["cross_section", "planar"] = "cross_section"
    d50_m: float = 8e-6  # median particle diameter
    size_sigma: float = 0.25  # lognormal log-std of the diameters
    collector_thickness_m: float = 3e-6
    collector_roughness_m: float = 0.1e-6  # std of the interface height
    electrode_thickness_m: float = 60e-6  # planar only: depth along axis 0 where the collector starts
    crack_fraction: float = 0.4  # fraction of particles that carry cracks
    closed_crack_fraction: float = 0.4  # of the cracked particles, those whose cracks are all closed
    cbd_filled_crack_fraction: float = 0.5  # of the open cracks, those filled with CBD
    # grain-boundary seeds per cracked particle (min, max): clusters of primary grains whose boundaries
    # crack; with ~20 of them a cracked section shows a network, not a few straight planes
    grains_per_particle: tuple[int, int] = (14, 28)
    crack_pair_probability: float = 0.3  # chance that a boundary between two clusters is cracked
    crack_width_vox: tuple[float, float] = (1.0, 2.5)
    crack_wiggle_vox: float = 2.0  # cracks meander around the boundary plane (intergranular path)
    surface_roughness: float = 0.05  # particle radius modulation (fraction of the radius, rms-ish)
    roughness_length_m: float = 0.3e-6
    fines_fraction: float = 0.03  # NMC fines (broken primary-grain clusters) as a share of the NMC target
    fines_diameter_m: tuple[float, float] = (0.3e-6, 1.0e-6)
    cbd_attach: float = 0.45  # CBD lies within this fraction of a radius of a particle: no floating islands
    cbd_neck_sigma_m: float = 0.6e-6  # blur of the solid indicator: sets how CBD hugs necks
    cbd_noise_length_m: float = 0.4e-6  # correlation length of the CBD noise
    cbd_noise_weight: float = 0.12
    overlap_tolerance: float = 0.08  # allowed particle overlap as a fraction of the smaller radius

    def __post_init__(self) -> None:
        # Lists (from JSON or a CLI) would make the key differ from the equal tuple: normalise.
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "grains_per_particle", tuple(int(n) for n in self.grains_per_particle))
        object.__setattr__(self, "crack_width_vox", tuple(float(w) for w in self.crack_width_vox))
        object.__setattr__(self, "fines_diameter_m", tuple(float(d) for d in self.fines_diameter_m))
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; one of {sorted(PRESETS)}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        if self.geometry not in ("cross_section", "planar"):
            raise ValueError(f"unknown geometry {self.geometry!r}")
        if not (self.voxel_size_m > 0 and self.d50_m > 4 * self.voxel_size_m):
            raise ValueError("need voxel_size_m > 0 and d50_m of at least 4 voxels")

    @property
    def targets(self) -> PresetFractions:
        return PRESETS[self.preset]

    def cache_key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]
