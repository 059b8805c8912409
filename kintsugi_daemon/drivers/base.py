"""The DualBeam protocol: the verbs of a kintsugi cycle, their pydantic models and typed errors.

Units are SI and named in every field (`_m`, `_s`, `_a`, `_v`, `_deg`, `_k`, `_pa`). Models are strict:
unknown fields, NaN/inf and type coercion are refused, so a typo in a recipe or a request never becomes a
silent default. Stage moves never default an axis to 0: an axis left out is an axis left alone.
Both the simulator and the AutoScript bridge implement `DualBeam`; the HTTP client implements it too, so
the daemon talks to either through one seam.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "API_PREFIX",
    "DEFAULT_DEADLINES_S",
    "MAX_DEADLINE_S",
    "MIN_DEADLINE_S",
    "MIN_LAYER_M",
    "MIN_PATTERN_M",
    "Aborted",
    "AcquireRequest",
    "Acquisition",
    "AcquisitionMetadata",
    "AutoFunctionRequest",
    "AutoFunctionResult",
    "BeamShift",
    "CommsLost",
    "DeadlineExceeded",
    "DepositRequest",
    "DepositResult",
    "DetectorName",
    "DetectorSettings",
    "DualBeam",
    "EdxRequest",
    "EdxResult",
    "ErrorBody",
    "FiducialRequest",
    "FiducialResult",
    "GisState",
    "InstrumentBusy",
    "InstrumentError",
    "InstrumentFault",
    "InstrumentIdentity",
    "InstrumentState",
    "InvalidRequest",
    "IonBeamSettings",
    "IonBeamState",
    "IonCurrent",
    "IonSpecies",
    "MillRequest",
    "MillResult",
    "PolishRequest",
    "ProbeCurrent",
    "Rectangle",
    "SafeStateResult",
    "StageMove",
    "StagePosition",
    "StopResult",
    "StrictModel",
    "Unauthorized",
    "Unsupported",
    "error_from_body",
]

IonSpecies = Literal["xe", "o", "ar", "n"]
DetectorName = Literal["cbs", "tld", "etd", "ice"]
Geometry = Literal["cross_section", "planar"]
BeamKind = Literal["electron", "ion"]

# Finite floats with a physical floor and ceiling; `allow_inf_nan=False` is on the model config. The
# floors refuse degenerate values (5e-324 A, a pattern of zero area) that `gt=0` lets through: below them
# no instrument can do what was asked, so such a request is a bug or a typo, never a plan.
MIN_PATTERN_M = 10e-9  # a pattern edge: below the ion probe's size there is no pattern
MIN_LAYER_M = 1e-9  # a slice or deposit thickness: below one atomic layer
MIN_BEAM_CURRENT_A = 1e-12  # 1 pA, the smallest current either column sets
MIN_DEADLINE_S = 1e-3  # no instrument call finishes, or is even sent, faster
Metres = Annotated[float, Field(ge=MIN_PATTERN_M, le=1e-2)]
Seconds = Annotated[float, Field(gt=0, le=3600)]
IonCurrent = Annotated[float, Field(ge=MIN_BEAM_CURRENT_A, le=2.5e-6)]  # Hydra plasma column: 1 pA .. 2.5 uA
ProbeCurrent = Annotated[float, Field(ge=MIN_BEAM_CURRENT_A, le=1e-7)]  # electron probe: 1 pA .. 100 nA

MAX_FRAME_TIME_S = 3600.0  # one image; longer is a typo (dwell in s instead of us), not a plan
MAX_EDX_POINTS = 4096 * 4096  # EDX grid points: beyond this the maps alone would not fit in memory
MAX_EDX_TIME_S = 24 * 3600.0
# The wire's constants, here so that the client needs nothing from the server module.
API_PREFIX = "/v1"
MAX_DEADLINE_S = 24 * 3600.0


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _field_error(model: type[BaseModel], field: str, value: object, message: str) -> ValidationError:
    """A validation error that names `field`, raised from a model validator checking several fields."""
    return ValidationError.from_exception_data(
        model.__name__,
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,), input=value)],
    )


# --- errors -----------------------------------------------------------------------------------------


class InstrumentError(Exception):
    """Base of every error a DualBeam raises; `kind` is what travels over the wire."""

    kind = "instrument_error"

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}


class InstrumentFault(InstrumentError):
    """The instrument reports a hardware or vacuum fault; the step did not complete."""

    kind = "instrument_fault"


class CommsLost(InstrumentError):
    """The instrument (or the bridge in front of it) could not be reached."""

    kind = "comms_lost"


class InvalidRequest(InstrumentError):
    """The request is malformed or out of range; `detail['field']` names the culprit."""

    kind = "invalid_request"


class Aborted(InstrumentError):
    """The operation was stopped before it completed (stop endpoint, abort, shutdown)."""

    kind = "aborted"


class DeadlineExceeded(InstrumentError):
    """The operation did not finish within its deadline; the caller has asked the instrument to stop."""

    kind = "deadline_exceeded"


class InstrumentBusy(InstrumentError):
    """Another operation is in progress (`detail['busy']` names it); nothing was done. Safe to retry later."""

    kind = "busy"


class Unauthorized(InstrumentError):
    """The instrument API refused our bearer token: a configuration error, not a comms failure."""

    kind = "unauthorized"


class Unsupported(InstrumentError):
    """This instrument cannot do the verb at all (e.g. EDX where the bridge has no API for it); nothing
    was done, and asking again will not help. `detail['verb']` names it."""

    kind = "unsupported"


_ERRORS: dict[str, type[InstrumentError]] = {
    cls.kind: cls
    for cls in (
        InstrumentFault,
        CommsLost,
        InvalidRequest,
        Aborted,
        DeadlineExceeded,
        InstrumentBusy,
        Unauthorized,
        Unsupported,
    )
}


class ErrorBody(StrictModel):
    kind: str
    message: str
    detail: dict[str, Any] = {}


def error_from_body(body: ErrorBody) -> InstrumentError:
    return _ERRORS.get(body.kind, InstrumentError)(body.message, detail=body.detail)


# --- identity and state ----------------------------------------------------------------------------


class InstrumentIdentity(StrictModel):
    model: str
    serial: str
    software: str
    simulated: bool


class StagePosition(StrictModel):
    x_m: float = Field(ge=-0.1, le=0.1)
    y_m: float = Field(ge=-0.1, le=0.1)
    z_m: float = Field(ge=-0.1, le=0.1)
    tilt_deg: float = Field(ge=-38.0, le=60.0)
    rotation_deg: float = Field(ge=-360.0, le=360.0)


class StageMove(StrictModel):
    """Absolute or relative stage move. Axes left as None are not moved (never defaulted to 0)."""

    mode: Literal["absolute", "relative"]
    x_m: float | None = Field(default=None, ge=-0.1, le=0.1)
    y_m: float | None = Field(default=None, ge=-0.1, le=0.1)
    z_m: float | None = Field(default=None, ge=-0.1, le=0.1)
    tilt_deg: float | None = Field(default=None, ge=-98.0, le=98.0)
    rotation_deg: float | None = Field(default=None, ge=-360.0, le=360.0)

    @model_validator(mode="after")
    def _some_axis(self) -> StageMove:
        if all(v is None for v in (self.x_m, self.y_m, self.z_m, self.tilt_deg, self.rotation_deg)):
            raise ValueError("a stage move must name at least one axis")
        return self


class GisState(StrictModel):
    inserted: bool
    heater_on: bool
    temperature_k: float
    valve_open: bool


class IonBeamSettings(StrictModel):
    species: IonSpecies
    current_a: IonCurrent
    voltage_v: float = Field(ge=500, le=30_000)


class IonBeamState(StrictModel):
    species: IonSpecies
    current_a: float
    voltage_v: float
    switch_time_s: float  # instrument time spent getting here (gas switch, current change)


class BeamShift(StrictModel):
    """Electron beam shift, written as a whole point (AutoScript's rule)."""

    x_m: float = Field(ge=-1e-4, le=1e-4)
    y_m: float = Field(ge=-1e-4, le=1e-4)


class InstrumentState(StrictModel):
    vacuum: Literal["pumped", "venting", "vented", "pumping", "fault"]
    chamber_pressure_pa: float
    electron_beam_on: bool
    electron_current_a: float  # measured (probe current); the setpoint is below
    electron_current_setpoint_a: float
    ion_current_setpoint_a: float  # `ion.current_a` is the measured current
    electron_voltage_v: float
    working_distance_m: float
    ion_beam_on: bool
    ion: IonBeamState
    gis: GisState
    beam_shift: BeamShift
    beam_shift_limit_m: float
    stage: StagePosition
    patterning: Literal["idle", "running", "paused"]
    busy: str | None  # the verb in progress, if any
    face_position_m: float  # how far the milled face has advanced from the start of the run
    pt_cap_thickness_m: float
    instrument_time_s: float  # simulated/real instrument time spent so far (what the timing model charged)


# --- destructive steps ------------------------------------------------------------------------------


class Rectangle(StrictModel):
    """A pattern or deposition area centred in the field of view, in the sample plane."""

    center_x_m: float = Field(ge=-1e-3, le=1e-3)
    center_y_m: float = Field(ge=-1e-3, le=1e-3)
    width_m: Metres
    height_m: Metres


class DepositRequest(StrictModel):
    area: Rectangle
    thickness_m: float = Field(ge=MIN_LAYER_M, le=10e-6)
    beam: BeamKind
    gis_temperature_k: float = Field(default=303.0, ge=293.0, le=333.0)


class DepositResult(StrictModel):
    duration_s: float
    thickness_m: float
    infiltration_depth_m: float
    cap_thickness_m: float
    # The instrument's state as the operation ended: the client needs no extra round trip before its next
    # step (None where a backend cannot read it cheaply; the daemon then asks `state()`).
    state: InstrumentState | None = None


class MillRequest(StrictModel):
    """Remove the next slice: a cleaning cross-section (or planar spin-mill pass) of `depth_m`."""

    pattern: Literal["cleaning_cross_section", "rectangle", "spin_mill"]
    area: Rectangle
    slice_thickness_m: float = Field(ge=MIN_LAYER_M, le=2e-6)
    current_a: IonCurrent
    species: IonSpecies
    application: Literal["si", "c", "al", "pt"] = "si"


class PolishRequest(StrictModel):
    area: Rectangle
    current_a: IonCurrent
    species: IonSpecies
    rocking_deg: float = Field(default=0.0, ge=0.0, le=15.0)
    passes: int = Field(default=1, ge=1, le=10)


class MillResult(StrictModel):
    duration_s: float
    removed_m: float  # what was really removed (thickness scatter)
    face_position_m: float
    completed: bool
    # The instrument's state as the operation ended: the client needs no extra round trip before its next
    # step (None where a backend cannot read it cheaply; the daemon then asks `state()`).
    state: InstrumentState | None = None


class FiducialRequest(StrictModel):
    """A drift-correction mark milled once at run start beside the region (as Auto Slice & View does) and
    imaged with every slice. Placed from the top centre of the current SEM field of view: x across,
    y down the face, in face-plane metres (a cross-section image row spans pixel / sin 52 deg)."""

    offset_x_m: float = Field(ge=-1e-4, le=1e-4)
    offset_y_m: float = Field(ge=-1e-4, le=1e-4)
    # The physical floors of every other verb: a 5e-324 A mark would take forever (instrument time inf).
    size_m: float = Field(ge=MIN_PATTERN_M, le=20e-6)
    depth_m: float = Field(default=0.5e-6, ge=MIN_LAYER_M, le=5e-6)
    current_a: IonCurrent
    species: IonSpecies


class FiducialResult(StrictModel):
    duration_s: float
    offset_x_m: float
    offset_y_m: float
    size_m: float
    state: InstrumentState | None = None  # as the pattern ends (see DepositResult.state)


class StopResult(StrictModel):
    stopped: str | None  # the verb that was running, if any


class SafeStateResult(StrictModel):
    patterning_stopped: bool
    beams_blanked: bool
    gis_retracted: bool


# --- imaging ----------------------------------------------------------------------------------------


class DetectorSettings(StrictModel):
    name: DetectorName
    mode: Literal["backscatter", "secondary", "ion"] | None = None
    brightness: float | None = Field(default=None, ge=0.0, le=1.0)  # None: keep the instrument's
    contrast: float | None = Field(default=None, ge=0.0, le=1.0)


class AcquireRequest(StrictModel):
    detectors: list[DetectorSettings] = Field(min_length=1, max_length=4)
    width_px: int = Field(ge=64, le=6144)
    height_px: int = Field(ge=64, le=4096)
    pixel_size_m: float = Field(gt=1e-10, le=1e-6)
    dwell_s: float = Field(ge=25e-9, le=1e-3)
    line_integration: int = Field(default=1, ge=1, le=255)
    voltage_v: float = Field(ge=350, le=30_000)
    current_a: ProbeCurrent

    @model_validator(mode="after")
    def _unique_detectors(self) -> AcquireRequest:
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detectors must be unique, got {names}")
        frame_s = self.frame_time_s()
        if frame_s > MAX_FRAME_TIME_S:
            raise _field_error(
                AcquireRequest,
                "dwell_s",
                self.dwell_s,
                f"one frame would take {frame_s:.0f} s (> {MAX_FRAME_TIME_S:.0f} s): "
                "check dwell_s, the frame size and line_integration",
            )
        return self

    def frame_time_s(self) -> float:
        return self.width_px * self.height_px * self.dwell_s * self.line_integration * 1.05


class AcquisitionMetadata(StrictModel):
    detectors: list[DetectorName]
    width_px: int
    height_px: int
    pixel_size_m: float
    dwell_s: float
    line_integration: int
    voltage_v: float
    current_a: float
    working_distance_m: float
    brightness: dict[str, float]
    contrast: dict[str, float]
    beam_shift: BeamShift
    face_position_m: float
    slice_index: int
    frame_time_s: float
    timestamp: float
    # The instrument's state as the operation ended: the client needs no extra round trip before its next
    # step (None where a backend cannot read it cheaply; the daemon then asks `state()`).
    state: InstrumentState | None = None


class Acquisition:
    """Images of one scan (one uint16 array per detector, simultaneous) and their metadata."""

    __slots__ = ("images", "metadata")

    def __init__(self, images: dict[str, np.ndarray], metadata: AcquisitionMetadata) -> None:
        self.images = images
        self.metadata = metadata


class AutoFunctionRequest(StrictModel):
    function: Literal["focus", "contrast_brightness", "stigmation"]
    detector: DetectorName | None = None


class AutoFunctionResult(StrictModel):
    function: str
    duration_s: float
    working_distance_m: float
    brightness: float | None = None
    contrast: float | None = None


class EdxRequest(StrictModel):
    elements: list[Literal["Ni", "Al", "Pt", "C", "F", "O", "Mn", "Co"]] = Field(min_length=1)
    voltage_v: float = Field(ge=3_000, le=30_000)
    current_a: ProbeCurrent
    step_m: float = Field(gt=5e-9, le=1e-6)
    dwell_s: float = Field(ge=25e-9, le=1e-2)  # the scan generator's shortest dwell, as for images
    width_m: float = Field(ge=MIN_PATTERN_M, le=5e-4)
    height_m: float = Field(ge=MIN_PATTERN_M, le=5e-4)

    def grid_points(self) -> int:
        return max(round(self.width_m / self.step_m), 1) * max(round(self.height_m / self.step_m), 1)

    def map_time_s(self) -> float:
        """Instrument time of the map (the DOMAIN.md timing model: points x dwell + 2 s overhead)."""
        return (self.width_m / self.step_m) * (self.height_m / self.step_m) * self.dwell_s + 2.0

    @model_validator(mode="after")
    def _bounded(self) -> EdxRequest:
        points = self.grid_points()
        if points > MAX_EDX_POINTS:
            raise _field_error(
                EdxRequest,
                "step_m",
                self.step_m,
                f"a {self.width_m:g} x {self.height_m:g} m map at step {self.step_m:g} m has {points} "
                f"points (> {MAX_EDX_POINTS}): use a coarser step or a smaller area",
            )
        duration = self.map_time_s()
        if duration > MAX_EDX_TIME_S:
            raise _field_error(
                EdxRequest,
                "dwell_s",
                self.dwell_s,
                f"the map would take {duration:.0f} s (> {MAX_EDX_TIME_S:.0f} s): "
                "use a shorter dwell_s, a coarser step or a smaller area",
            )
        return self


class EdxResult:
    """Element count maps (float32, one per element) on the EDX grid."""

    __slots__ = ("duration_s", "maps", "step_m")

    def __init__(self, maps: dict[str, np.ndarray], step_m: float, duration_s: float) -> None:
        self.maps = maps
        self.step_m = step_m
        self.duration_s = duration_s


# --- the protocol -----------------------------------------------------------------------------------

# Deadlines per verb at time scale 1, generous over the DOMAIN.md timing model; callers scale them.
DEFAULT_DEADLINES_S: dict[str, float] = {
    "identity": 10.0,
    "state": 10.0,
    "move_stage": 120.0,
    "set_ion_beam": 600.0,
    "set_beam_shift": 10.0,
    "deposit_pt": 900.0,
    "mill": 900.0,
    "polish": 900.0,
    "mill_fiducial": 900.0,
    "acquire": 600.0,
    "auto_function": 180.0,
    "edx_map": 3600.0,
    "stop": 10.0,
    "safe_state": 60.0,
}


@runtime_checkable
class DualBeam(Protocol):
    """What the daemon needs of a DualBeam. Every call takes a deadline in seconds (None: the default).

    Implementations raise only `InstrumentError` subclasses. Destructive verbs (deposit_pt, mill,
    polish) are never retried by an implementation: that decision belongs to the journal.
    """

    async def identity(self, *, deadline_s: float | None = None) -> InstrumentIdentity: ...
    async def state(self, *, deadline_s: float | None = None) -> InstrumentState: ...
    async def move_stage(self, move: StageMove, *, deadline_s: float | None = None) -> StagePosition: ...
    async def set_ion_beam(
        self, settings: IonBeamSettings, *, deadline_s: float | None = None
    ) -> IonBeamState: ...
    async def set_beam_shift(self, shift: BeamShift, *, deadline_s: float | None = None) -> BeamShift: ...
    async def deposit_pt(
        self, request: DepositRequest, *, deadline_s: float | None = None
    ) -> DepositResult: ...
    async def mill(self, request: MillRequest, *, deadline_s: float | None = None) -> MillResult: ...
    async def polish(self, request: PolishRequest, *, deadline_s: float | None = None) -> MillResult: ...
    async def mill_fiducial(
        self, request: FiducialRequest, *, deadline_s: float | None = None
    ) -> FiducialResult: ...
    async def acquire(self, request: AcquireRequest, *, deadline_s: float | None = None) -> Acquisition: ...
    async def auto_function(
        self, request: AutoFunctionRequest, *, deadline_s: float | None = None
    ) -> AutoFunctionResult: ...
    async def edx_map(self, request: EdxRequest, *, deadline_s: float | None = None) -> EdxResult: ...
    async def stop(self, *, deadline_s: float | None = None) -> StopResult: ...
    async def safe_state(self, *, deadline_s: float | None = None) -> SafeStateResult: ...
