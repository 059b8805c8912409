"""The DualBeam's fixed figures and the time each operation takes (DOMAIN.md timing model).

One home, three users: the simulator behaves by these numbers (and charges the timing model as instrument
time, sleeping `time * time_scale` real seconds), the daemon computes beam shifts and judges interrupted
steps with them, and the estimator uses them for ETAs and `kintsugi validate`.
"""

from __future__ import annotations

import math

__all__ = [
    "AMBIENT_K",
    "AUTO_FUNCTION_S",
    "BEAM_SHIFT_LIMIT_M",
    "GAS_SWITCH_S",
    "GIS_MIN_OPERATING_K",
    "MILL_YIELD_UM3_PER_NC",
    "POLISH_REMOVAL_M",
    "SEM_FIB_ANGLE_DEG",
    "SIN_SEM_FIB",
    "deposit_time_s",
    "edx_time_s",
    "frame_time_s",
    "ion_switch_time_s",
    "mill_time_s",
    "stage_move_time_s",
]

# Geometry: the electron column sits at 52 deg to the ion column; a cross-section face (milled parallel to
# the ion beam) is seen by the SEM foreshortened by sin(52 deg).
SEM_FIB_ANGLE_DEG = 52.0
SIN_SEM_FIB = math.sin(math.radians(SEM_FIB_ANGLE_DEG))
BEAM_SHIFT_LIMIT_M = 10e-6  # electron beam shift range each way
AMBIENT_K = 294.0  # chamber temperature: an unheated GIS precursor sits here
GIS_MIN_OPERATING_K = 300.0  # Pt precursor below this does not flow enough to deposit
POLISH_REMOVAL_M = 5e-9  # face removed per low-current polish pass (nominal)

# Sputter yield per unit charge (um^3/nC) by species and application. Xe on Si ~0.53 reproduces the
# DOMAIN.md example (40 um^3 at 15 nA in ~5 s); O+ mills carbon-rich material fast (est.).
MILL_YIELD_UM3_PER_NC: dict[str, dict[str, float]] = {
    "xe": {"si": 0.53, "c": 0.45, "al": 0.60, "pt": 0.35},
    "ar": {"si": 0.30, "c": 0.28, "al": 0.35, "pt": 0.20},
    "n": {"si": 0.25, "c": 0.35, "al": 0.28, "pt": 0.16},
    "o": {"si": 0.30, "c": 1.20, "al": 0.25, "pt": 0.18},
}

AUTO_FUNCTION_S = {"focus": 15.0, "stigmation": 20.0, "contrast_brightness": 3.0}
GAS_SWITCH_S = 180.0  # plasma gas change: minutes
CURRENT_CHANGE_S = 3.0
GIS_INSERT_S = 5.0
GIS_RETRACT_S = 3.0
GIS_WARMUP_S_PER_K = 1.5  # up to ~15 s from a cold heater
E_BEAM_DEP_RATE_M_S = 2.5e-9  # thin layer (~100 nm) in ~40 s
ION_BEAM_DEP_RATE_M_S = 1.2e-8


def frame_time_s(width_px: int, height_px: int, dwell_s: float, line_integration: int) -> float:
    return width_px * height_px * dwell_s * line_integration * 1.05  # 5 % flyback


def mill_time_s(volume_m3: float, current_a: float, species: str, application: str) -> float:
    yield_um3_nc = MILL_YIELD_UM3_PER_NC[species][application]
    charge_nc = (volume_m3 * 1e18) / yield_um3_nc
    return charge_nc * 1e-9 / current_a


def deposit_time_s(thickness_m: float, beam: str, warmup_k: float, gis_inserted: bool) -> float:
    rate = E_BEAM_DEP_RATE_M_S if beam == "electron" else ION_BEAM_DEP_RATE_M_S
    insert = 0.0 if gis_inserted else GIS_INSERT_S
    return insert + max(warmup_k, 0.0) * GIS_WARMUP_S_PER_K + thickness_m / rate + GIS_RETRACT_S


def ion_switch_time_s(species_changed: bool, current_changed: bool) -> float:
    return (GAS_SWITCH_S if species_changed else 0.0) + (CURRENT_CHANGE_S if current_changed else 0.0)


def stage_move_time_s(distance_m: float, tilt_change_deg: float) -> float:
    return 1.0 + distance_m / 1e-3 * 2.0 + abs(tilt_change_deg) / 10.0


def edx_time_s(width_m: float, height_m: float, step_m: float, dwell_s: float) -> float:
    return (width_m / step_m) * (height_m / step_m) * dwell_s + 2.0
