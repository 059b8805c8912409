"""Guards that suspend a run and resume it on their own: vacuum, beam current band, GIS temperature, disk.

Each guard trips at its threshold and clears only past a stricter one (hysteresis), and a run resumes
only after every guard has stayed clear for `settle_s`, so a flickering reading cannot toggle the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from kintsugi_daemon.config import GuardSettings
from kintsugi_daemon.drivers.base import InstrumentState

__all__ = ["GuardReading", "Guards"]

HYSTERESIS = 0.5  # a tripped guard clears at half its tolerance (current) or this fraction above (disk)


@dataclass(frozen=True)
class GuardReading:
    name: str
    tripped: bool
    message: str


class Guards:
    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self._tripped: set[str] = set()
        self._clear_since: float | None = None

    @property
    def tripped(self) -> frozenset[str]:
        return frozenset(self._tripped)

    def _band(self, name: str, actual: float, expected: float) -> GuardReading:
        tol = self.settings.beam_current_tolerance
        off = abs(actual - expected) / expected
        limit = tol * HYSTERESIS if name in self._tripped else tol
        return GuardReading(
            name,
            off > limit,
            f"{name.replace('_', ' ')} {actual * 1e9:.2f} nA is {off:.0%} off {expected * 1e9:.2f} nA",
        )

    def evaluate(self, state: InstrumentState, free_bytes: int, *, needs_gis: bool) -> list[GuardReading]:
        s = self.settings
        readings = [
            GuardReading(
                "vacuum",
                state.vacuum != "pumped",
                f"chamber vacuum {state.vacuum} ({state.chamber_pressure_pa:.1e} Pa)",
            ),
            # Measured against the setpoint: the mill and the polish set different currents.
            self._band("ion_current", state.ion.current_a, state.ion_current_setpoint_a),
        ]
        if state.electron_beam_on:
            readings.append(
                self._band("electron_current", state.electron_current_a, state.electron_current_setpoint_a)
            )
        if needs_gis and state.gis.heater_on:
            readings.append(
                GuardReading(
                    "gis_temperature",
                    state.gis.temperature_k < s.min_gis_temperature_k,
                    f"GIS at {state.gis.temperature_k:.0f} K",
                )
            )
        disk_limit = s.min_free_disk_bytes * (1 + HYSTERESIS if "disk" in self._tripped else 1)
        readings.append(GuardReading("disk", free_bytes < disk_limit, f"{free_bytes / 1e9:.2f} GB free"))
        return readings

    def update(self, readings: list[GuardReading], now: float) -> tuple[list[GuardReading], bool]:
        """Record readings; return (newly tripped, settled clear: every guard clear for settle_s)."""
        newly = [r for r in readings if r.tripped and r.name not in self._tripped]
        self._tripped = {r.name for r in readings if r.tripped}
        if self._tripped:
            self._clear_since = None
            return newly, False
        if self._clear_since is None:
            self._clear_since = now
        return newly, now - self._clear_since >= self.settings.settle_s
