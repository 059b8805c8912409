"""Material codes of the simulated specimen and their physical constants.

The specimen volume is a uint8 array of these codes; axis 0 is always the milling direction (the face
advances along it), axis 1 is image rows, axis 2 image columns. Pt infiltration is kept as a separate
boolean mask over the same voxels so the specimen itself can stay a read-only, cached array.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = [
    "BACKSCATTER_YIELD",
    "CANONICAL_CLASSES",
    "ELECTRON_RANGE_5KV_M",
    "OUTSIDE_LABEL",
    "Material",
    "canonical_labels",
]


class Material(IntEnum):
    VACUUM = 0  # outside the specimen (above the surface in planar geometry, past the edge)
    PORE = 1  # empty pore between particles
    NMC = 2  # active material
    CBD = 3  # carbon-binder domain (solid + its nanopores)
    AL = 4  # current collector
    CRACK = 5  # empty intergranular crack inside an NMC particle
    CBD_CRACK = 6  # crack inside a particle filled with CBD
    PT_CAP = 7  # the protective Pt-C cap above the top surface: rendered into images, never in the volume


# Canonical class values shared by labels, model metadata and metrics (DESIGN.md).
CANONICAL_CLASSES: dict[str, int] = {"pore": 0, "unfilled_pore": 1, "active": 2, "cbd": 3, "collector": 4}
# Pixels that are not specimen (vacuum above it or past its edge, the Pt cap on top): never a class.
OUTSIDE_LABEL = 255

# Backscatter yield eta at 5 kV (DOMAIN.md, Reuter fit, mass-averaged).
BACKSCATTER_YIELD: dict[Material | str, float] = {
    Material.VACUUM: 0.0,
    Material.PORE: 0.0,
    Material.NMC: 0.21,
    Material.CBD: 0.08,
    Material.AL: 0.15,
    Material.CRACK: 0.0,
    Material.CBD_CRACK: 0.08,
    Material.PT_CAP: 0.39,
    "pt_electron": 0.39,  # Pt-C deposited with the electron beam
    "pt_ion": 0.44,  # Pt-C deposited with the ion beam
}

# Kanaya-Okayama electron range at 5 kV (DOMAIN.md, est.).
ELECTRON_RANGE_5KV_M: dict[Material | str, float] = {
    Material.NMC: 234e-9,
    Material.CBD: 535e-9,
    Material.CBD_CRACK: 535e-9,
    Material.AL: 415e-9,
    Material.PT_CAP: 240e-9,
    "pt": 240e-9,
}

_UNFILLED = CANONICAL_CLASSES["unfilled_pore"]
# material code -> canonical class for voxels without Pt
_CLASS_OF_MATERIAL = np.array(
    [
        OUTSIDE_LABEL,  # VACUUM: not specimen
        _UNFILLED,  # PORE
        CANONICAL_CLASSES["active"],  # NMC
        CANONICAL_CLASSES["cbd"],  # CBD
        CANONICAL_CLASSES["collector"],  # AL
        _UNFILLED,  # CRACK
        CANONICAL_CLASSES["cbd"],  # CBD_CRACK
        OUTSIDE_LABEL,  # PT_CAP: on top of the specimen, not part of it
    ],
    dtype=np.uint8,
)


def canonical_labels(materials: np.ndarray, pt: np.ndarray | None) -> np.ndarray:
    """Map material codes (and the Pt mask) to canonical class values: Pt-filled voxels are `pore`."""
    labels: np.ndarray = _CLASS_OF_MATERIAL[materials]
    if pt is not None:
        labels[pt] = CANONICAL_CLASSES["pore"]
    return labels
