"""Instrument states for unit tests that judge one (guards, step reconciliation)."""

from __future__ import annotations

from kintsugi_daemon.drivers.base import BeamShift, GisState, InstrumentState, IonBeamState, StagePosition

__all__ = ["state"]


def state(
    *,
    ion_a: float = 15e-9,
    vacuum: str = "pumped",
    gis_k: float = 303.0,
    face_m: float = 0.0,
    cap_m: float = 1e-6,
) -> InstrumentState:
    """A pumped, idle instrument; the keywords set what a test looks at."""
    return InstrumentState(
        vacuum=vacuum,  # type: ignore[arg-type]
        chamber_pressure_pa=2e-4,
        electron_beam_on=True,
        electron_current_a=5e-9,
        electron_current_setpoint_a=5e-9,
        electron_voltage_v=5e3,
        ion_current_setpoint_a=15e-9,
        working_distance_m=4e-3,
        ion_beam_on=True,
        ion=IonBeamState(species="xe", current_a=ion_a, voltage_v=30e3, switch_time_s=0.0),
        gis=GisState(inserted=True, heater_on=True, temperature_k=gis_k, valve_open=False),
        beam_shift=BeamShift(x_m=0.0, y_m=0.0),
        beam_shift_limit_m=10e-6,
        stage=StagePosition(x_m=0.0, y_m=0.0, z_m=4e-3, tilt_deg=52.0, rotation_deg=0.0),
        patterning="idle",
        busy=None,
        face_position_m=face_m,
        pt_cap_thickness_m=cap_m,
        instrument_time_s=0.0,
    )
