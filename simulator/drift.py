"""Specimen drift over a night (DOMAIN.md "Drift"): after settling, a thermal drift of a few nm per minute
mostly in one direction for hours, a random walk on top, and a jump after each mill (and stage or gas
change). Uncorrected, a 400-slice night leaves the region by tens of pixels at 40 nm.

Positions are face-plane metres in the frame of the field-of-view origin (x, y).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["POST_MILL_JUMP_M", "THERMAL_NM_PER_MIN", "WALK_NM_PER_SQRT_S", "Drift"]

THERMAL_NM_PER_MIN = 3.0  # (est.) settled thermal/stage drift
WALK_NM_PER_SQRT_S = 0.4  # random walk: ~3 nm after a minute
POST_MILL_JUMP_M = 25e-9  # per mill, per axis (1 sigma)


class Drift:
    def __init__(self, rng_walk: np.random.Generator, rng_jump: np.random.Generator, thermal: bool = True):
        self._walk = rng_walk
        self._jump = rng_jump
        direction = rng_walk.uniform(0.0, 2.0 * math.pi)  # one direction for the whole night
        speed = THERMAL_NM_PER_MIN * 1e-9 / 60.0 if thermal else 0.0
        self.velocity_m_s = np.array([math.cos(direction), math.sin(direction)]) * speed
        self.position_m = np.zeros(2)

    def advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self.position_m += self.velocity_m_s * seconds
        self.position_m += self._walk.normal(0.0, WALK_NM_PER_SQRT_S * 1e-9 * math.sqrt(seconds), 2)

    def jump(self, scale: float = 1.0) -> None:
        self.position_m += self._jump.normal(0.0, POST_MILL_JUMP_M * scale, 2)

    def inject(self, dx_m: float, dy_m: float) -> None:
        """A test-only step (a knock, a stage glitch): what the daemon must correct or suspend on."""
        self.position_m += np.array([dx_m, dy_m])
