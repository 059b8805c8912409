"""Daemon settings and the run recipe: strict pydantic models loaded from TOML, with env overrides.

Strict means: unknown keys, NaN/inf, type coercion ("5" for 5) and out-of-range values are refused with the
key named (`ConfigError`), because a typo in an overnight recipe must fail at 6 pm, not at 3 am.
Environment overrides use `KINTSUGI_<SECTION>__<KEY>=<TOML value>` (e.g. `KINTSUGI_MQTT__PORT=1884`,
`KINTSUGI_INSTRUMENT__TOKEN='"s3cret"'`; a value that is not valid TOML is taken as a string).
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kintsugi_daemon.drivers.base import (
    MIN_LAYER_M,
    MIN_PATTERN_M,
    DetectorName,
    IonCurrent,
    IonSpecies,
    ProbeCurrent,
)

__all__ = [
    "AdaptSettings",
    "ConfigError",
    "CurtainingAdapt",
    "DaemonSettings",
    "DriftAdapt",
    "FocusAdapt",
    "GuardSettings",
    "HomeAssistantSettings",
    "ImagingAdapt",
    "ImagingSettings",
    "InstrumentSettings",
    "LoggingSettings",
    "MillSettings",
    "MqttSettings",
    "NotifySettings",
    "OperatorCredentials",
    "PolishSettings",
    "PtAdapt",
    "PtSettings",
    "Recipe",
    "RegionOfInterest",
    "RunSettings",
    "SegmentationSettings",
    "StopAdapt",
    "ThicknessAdapt",
    "WebSettings",
    "load_recipe",
    "load_settings",
    "parse_recipe",
    "read_secret",
]

ENV_PREFIX = "KINTSUGI_"


class ConfigError(ValueError):
    """A configuration or recipe problem; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


PositiveM = Annotated[float, Field(gt=0)]

# --- daemon settings --------------------------------------------------------------------------------


def read_secret(path: Path, key: str) -> str:
    """A password or token from its file (stripped); a missing, unreadable or empty file is a ConfigError
    naming the key and the file."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty")
    return secret


class MqttSettings(Strict):
    """The broker connection (`[mqtt]`): one class for the daemon's link, the operator's client and tests."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    client_id: str | None = None  # default kintsugi-daemon-<instrument_id>: a second daemon kicks the first
    # The broker declares the daemon lost (Last Will) after 1.5 x keepalive of silence.
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    # "5" lets the daemon see the retain flag of commands sent during a run (and refuse them);
    # "3.1.1" only for a broker without MQTT 5 support.
    protocol: Literal["5", "3.1.1"] = "5"

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return read_secret(self.password_file, "mqtt.password_file")
        return self.password


class InstrumentSettings(Strict):
    url: str = "http://127.0.0.1:8780"
    token: str | None = None
    token_file: Path | None = None
    deadline_scale: float = Field(default=1.0, gt=0, le=10)

    def resolved_token(self) -> str | None:
        if self.token_file is not None:
            return read_secret(self.token_file, "instrument.token_file")
        return self.token


class OperatorCredentials(Strict):
    """`[operator]`: who `kintsugi start|pause|status|watch ...` log in as. Never the daemon's own
    `[mqtt]` user: the ACL lets the daemon neither send commands nor read its status back."""

    username: str | None = None
    password: str | None = None
    password_file: Path | None = None

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password


class LoggingSettings(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_output: bool = True


class NotifySettings(Strict):
    """Apprise notifications (service/notify.py): run finished, faulted, suspended too long, fiducial lost."""

    urls: list[str] = Field(default_factory=list, max_length=32)  # Apprise URLs; empty: off
    urls_file: Path | None = None  # one URL a line (secrets out of the settings file); added to `urls`
    on: list[Literal["finished", "faulted", "suspended", "fiducial_lost"]] = Field(
        default=["finished", "faulted", "suspended", "fiducial_lost"]
    )
    suspended_after_s: float = Field(default=900.0, ge=0, le=7 * 86400)
    attach_overlay: bool = True  # the latest overlay PNG where the service takes attachments
    timeout_s: float = Field(default=20.0, gt=0, le=600)  # one delivery; a dead service never waits longer
    queue: int = Field(default=32, ge=1, le=10_000)  # pending notifications; the oldest is dropped past it

    def resolved_urls(self) -> list[str]:
        urls = list(self.urls)
        if self.urls_file is not None:
            text = self.urls_file.read_text()
            urls += [u.strip() for u in text.splitlines() if u.strip() and not u.lstrip().startswith("#")]
        return urls


class HomeAssistantSettings(Strict):
    """Home Assistant MQTT discovery (service/home_assistant.py): sensors for state, slice, ETA, alerts."""

    discovery: bool = False
    prefix: str = Field(default="homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$")


class WebSettings(Strict):
    """`kintsugi web`: the live page. It subscribes as a monitor (read-only); operators log in."""

    host: str = "127.0.0.1"
    port: int = Field(default=8790, ge=0, le=65535)  # 0: any free port (tests)
    username: str | None = "monitor"  # MQTT user the page subscribes as
    password: str | None = None
    password_file: Path | None = None
    runs_dir: Path | None = None  # run directories on this machine (default: data_root); else MQTT previews
    instruments: list[str] = Field(default_factory=list)  # empty: every instrument on the broker
    session_ttl_s: float = Field(default=8 * 3600, gt=0, le=7 * 86400)  # an operator login lasts this long

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password


class DaemonSettings(Strict):
    instrument_id: str = Field(default="hydra-01", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    data_root: Path = Path("/var/lib/kintsugi/runs")
    journal_path: Path | None = None  # default: <data_root>/journal.sqlite
    recipes_dir: Path | None = None  # `start` may name a recipe here (<name>.toml); None: inline only
    mqtt: MqttSettings = MqttSettings()
    instrument: InstrumentSettings = InstrumentSettings()
    logging: LoggingSettings = LoggingSettings()
    notify: NotifySettings = NotifySettings()
    home_assistant: HomeAssistantSettings = HomeAssistantSettings()
    web: WebSettings = WebSettings()
    operator: OperatorCredentials = OperatorCredentials()

    @property
    def journal_file(self) -> Path:
        return self.journal_path or self.data_root / "journal.sqlite"


# --- the run recipe ---------------------------------------------------------------------------------


class RunSettings(Strict):
    name: str = Field(min_length=1, max_length=120)
    geometry: Literal["cross_section", "planar"] = "cross_section"
    slices: int | None = Field(default=None, ge=1, le=100_000)
    target_depth_m: float | None = Field(default=None, gt=0, le=1e-3)
    slice_thickness_m: float = Field(default=40e-9, ge=2e-9, le=2e-6)
    min_slice_thickness_m: float = Field(default=10e-9, ge=1e-9, le=2e-6)
    max_slice_thickness_m: float = Field(default=200e-9, ge=1e-9, le=5e-6)

    @model_validator(mode="after")
    def _depth_or_count(self) -> Self:
        if (self.slices is None) == (self.target_depth_m is None):
            raise ValueError("give exactly one of run.slices or run.target_depth_m")
        if not self.min_slice_thickness_m <= self.slice_thickness_m <= self.max_slice_thickness_m:
            raise ValueError(
                "run.slice_thickness_m must lie within [min_slice_thickness_m, max_slice_thickness_m]"
            )
        return self

    @property
    def total_slices(self) -> int:
        if self.slices is not None:
            return self.slices
        assert self.target_depth_m is not None
        return math.ceil(self.target_depth_m / self.slice_thickness_m - 1e-9)


class RegionOfInterest(Strict):
    center_x_m: float = Field(default=0.0, ge=-1e-3, le=1e-3)
    center_y_m: float = Field(default=0.0, ge=-1e-3, le=1e-3)
    width_m: float = Field(ge=MIN_PATTERN_M, le=1e-3)
    height_m: float = Field(ge=MIN_PATTERN_M, le=1e-3)


class PtSettings(Strict):
    every_slices: int = Field(default=1, ge=0, le=10_000)  # 0: never re-deposit
    thickness_m: float = Field(default=100e-9, ge=MIN_LAYER_M, le=10e-6)
    beam: Literal["electron", "ion"] = "electron"
    gis_temperature_k: float = Field(default=303.0, ge=293.0, le=333.0)


class MillSettings(Strict):
    species: IonSpecies = "xe"
    current_a: IonCurrent = 15e-9
    application: Literal["si", "c", "al", "pt"] = "si"
    pattern: Literal["cleaning_cross_section", "rectangle", "spin_mill"] = "cleaning_cross_section"


class PolishSettings(Strict):
    current_a: IonCurrent = 1e-9
    passes: int = Field(default=1, ge=0, le=10)  # 0: no polish step
    rocking_deg: float = Field(default=0.0, ge=0.0, le=15.0)


class ImagingSettings(Strict):
    detectors: list[DetectorName] = Field(default=["cbs", "tld"], min_length=1, max_length=4)
    width_px: int = Field(default=1536, ge=64, le=6144)
    height_px: int = Field(default=1024, ge=64, le=4096)
    pixel_size_m: float = Field(default=40e-9, gt=1e-10, le=1e-6)
    dwell_s: float = Field(default=3e-6, ge=25e-9, le=1e-3)
    line_integration: int = Field(default=1, ge=1, le=255)
    voltage_v: float = Field(default=5_000.0, ge=350, le=30_000)
    current_a: ProbeCurrent = 5e-9
    y_correction: bool = True  # follow the receding face with beam shift (cross-section)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        if len(set(self.detectors)) != len(self.detectors):
            raise ValueError(f"imaging.detectors must be unique, got {self.detectors}")
        return self


class SegmentationSettings(Strict):
    enabled: bool = True
    model: str = "builtin"  # "builtin-int8" (the int8 twin) or a path to an ONNX file
    # Inference threads; default: the CPUs the daemon may use (its affinity) but one (inference/session.py).
    threads: int | None = Field(default=None, ge=1, le=256)
    # Activations of one inference call; the tiler plans the fewest, largest tiles that fit (tiling.py).
    memory_budget_mb: int = Field(default=2048, ge=64, le=1 << 20)
    # The model contract for a model exported without kintsugi.* metadata (Avizo, say), or overrides of
    # it: classes, channels, normalisation, pixel_size_m, tile, halo, stride, layout (inference/contract.py).
    metadata: dict[str, Any] | None = None


class PtAdapt(Strict):
    """Re-deposit Pt when pores stop filling or the infiltration ahead of the face runs out (lag 2)."""

    enabled: bool = True
    # unfilled / all pores on a segmented slice. The shipped model calls 1-4 % of a filled face's pores
    # unfilled (bench_adapt); a face the front has reached shows 6 % and more.
    max_unfilled_share: float = Field(default=0.05, gt=0, lt=1)
    # Deposit when the next slice would be imaged less than this short of the learnt reach.
    margin_m: float = Field(default=0.0, ge=0, le=20e-6)
    # The most of its reported depth a deposit is trusted to fill (the densest electrode's share; the
    # reach trusted before any deposit was outrun). Higher: fewer deposits, unfilled slices at dense bands.
    max_reach_fraction: float = Field(default=0.3, gt=0, le=1)
    assumed_infiltration_m: float = Field(default=1e-6, gt=0, le=50e-6)  # when a deposit reports no depth
    min_interval_slices: int = Field(default=1, ge=1, le=1000)
    max_interval_slices: int = Field(default=50, ge=1, le=10_000)


class DriftAdapt(Strict):
    """Fiducial shift -> beam shift (whole point), stage move near the limit, suspend on a poor match."""

    enabled: bool = True
    min_score: float = Field(default=0.75, gt=0, lt=1)
    deadband_px: float = Field(default=0.3, ge=0, le=50)
    stage_fraction: float = Field(default=0.8, gt=0, le=1)  # of the beam-shift limit: beyond it, move stage
    max_step_px: float = Field(default=40.0, gt=0, le=1000)  # a larger jump in one slice is not believed
    fiducial_x_px: int = Field(default=0, ge=0, le=6143)  # the fiducial's window in the image
    fiducial_y_px: int = Field(default=0, ge=0, le=4095)
    fiducial_width_px: int = Field(default=256, ge=32, le=6144)
    fiducial_height_px: int = Field(default=128, ge=32, le=4096)

    @property
    def window(self) -> tuple[slice, slice]:
        """The fiducial's window as image (rows, columns)."""
        y, x = self.fiducial_y_px, self.fiducial_x_px
        return slice(y, y + self.fiducial_height_px), slice(x, x + self.fiducial_width_px)


class FocusAdapt(Strict):
    """Autofocus when sharpness degrades or the face has receded far; autostigmation if that did not help."""

    enabled: bool = True
    sharpness_drop: float = Field(default=0.2, gt=0, lt=1)  # fraction below the best since the last focus
    refocus_recession_m: float | None = Field(default=5e-6, gt=0, le=1e-3)
    min_interval_slices: int = Field(default=3, ge=1, le=1000)
    stigmation: bool = True


class ThicknessAdapt(Strict):
    """The measured face advance corrects the next mill, within run.min/max_slice_thickness_m."""

    enabled: bool = True
    gain: float = Field(
        default=0.5, gt=0, le=1
    )  # fraction of the accumulated depth error corrected per slice


class CurtainingAdapt(Strict):
    """Stripe energy above threshold: extra polish pass, then lower mill current, then a fresh Pt cap."""

    enabled: bool = True
    # Curtain rms / the image's grey spread (observations.stripe_energy). In the simulator at 15 nA Xe:
    # ~0.02 under a 1 um Pt cap, ~0.08 under 0.3 um, ~0.15 without one; ~0.27 without one at 60 nA.
    max_stripe_energy: float = Field(default=0.06, gt=0, lt=1)
    max_polish_passes: int = Field(default=3, ge=0, le=10)
    min_mill_current_a: float = Field(default=3e-9, gt=0, le=2.5e-6)
    current_factor: float = Field(default=0.5, gt=0, lt=1)
    relax_after_slices: int = Field(default=10, ge=1, le=10_000)


class ImagingAdapt(Strict):
    """Dwell / line integration from the Rose criterion; auto contrast-brightness on saturation."""

    enabled: bool = True
    rose_k: float = Field(default=5.0, ge=1, le=50)  # contrast must be >= k x noise
    min_dwell_s: float = Field(default=1e-6, ge=25e-9, le=1e-3)
    max_dwell_s: float = Field(default=10e-6, ge=25e-9, le=1e-3)
    max_line_integration: int = Field(default=4, ge=1, le=255)
    max_saturation: float = Field(default=0.01, gt=0, lt=1)
    # on this many slices in a row: one saturated slice is the face (unfilled pores charge), not the settings
    saturation_slices: int = Field(default=3, ge=1, le=100)


class StopAdapt(Strict):
    """Stop at the target depth (measured), when the collector is reached or the region is exhausted."""

    enabled: bool = True
    collector_fraction: float | None = Field(default=0.5, gt=0, le=1)
    max_outside_fraction: float | None = Field(default=0.6, gt=0, le=1)
    confirm_slices: int = Field(default=3, ge=1, le=100)


class AdaptSettings(Strict):
    # "fixed": the published schedule (Pt every pt.every_slices), no decisions; "adaptive": the tables below.
    policy: Literal["fixed", "adaptive"] = "fixed"
    pt: PtAdapt = PtAdapt()
    drift: DriftAdapt = DriftAdapt()
    focus: FocusAdapt = FocusAdapt()
    thickness: ThicknessAdapt = ThicknessAdapt()
    curtaining: CurtainingAdapt = CurtainingAdapt()
    imaging: ImagingAdapt = ImagingAdapt()
    stop: StopAdapt = StopAdapt()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.pt.min_interval_slices > self.pt.max_interval_slices:
            raise ValueError("adapt.pt.min_interval_slices exceeds adapt.pt.max_interval_slices")
        if self.imaging.min_dwell_s > self.imaging.max_dwell_s:
            raise ValueError("adapt.imaging.min_dwell_s exceeds adapt.imaging.max_dwell_s")
        return self


class GuardSettings(Strict):
    beam_current_tolerance: float = Field(default=0.15, gt=0, lt=1)  # fraction off the set current
    min_gis_temperature_k: float = Field(default=300.0, ge=273.0, le=340.0)
    min_free_disk_bytes: int = Field(default=2_000_000_000, ge=0)
    settle_s: float = Field(default=10.0, ge=0, le=3600)  # a guard must stay clear this long to resume
    poll_s: float = Field(default=5.0, gt=0, le=600)


class Recipe(Strict):
    run: RunSettings
    roi: RegionOfInterest
    pt: PtSettings = PtSettings()
    mill: MillSettings = MillSettings()
    polish: PolishSettings = PolishSettings()
    imaging: ImagingSettings = ImagingSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    adapt: AdaptSettings = AdaptSettings()
    guards: GuardSettings = GuardSettings()

    @model_validator(mode="after")
    def _adapt_fits_recipe(self) -> Self:
        """Settings that contradict another section are refused only when the adaptive policy reads them."""
        a = self.adapt
        if a.policy != "adaptive":
            return self
        img = self.imaging
        problems = []
        if a.pt.enabled and not self.segmentation.enabled:
            problems.append("adapt.pt.enabled needs segmentation.enabled (it reads the unfilled-pore share)")
        if a.stop.enabled and a.stop.collector_fraction is not None and not self.segmentation.enabled:
            problems.append("adapt.stop.collector_fraction needs segmentation.enabled")
        d = a.drift
        if d.enabled and (
            d.fiducial_x_px + d.fiducial_width_px > img.width_px
            or d.fiducial_y_px + d.fiducial_height_px > img.height_px
        ):
            problems.append(
                f"adapt.drift.fiducial_* window ({d.fiducial_x_px}+{d.fiducial_width_px}, "
                f"{d.fiducial_y_px}+{d.fiducial_height_px}) leaves the {img.width_px}x{img.height_px} image"
            )
        im = a.imaging
        if im.enabled and not im.min_dwell_s <= img.dwell_s <= im.max_dwell_s:
            problems.append(
                f"imaging.dwell_s {img.dwell_s:g} lies outside [adapt.imaging.min_dwell_s, max_dwell_s]"
            )
        if im.enabled and img.line_integration > im.max_line_integration:
            problems.append("imaging.line_integration exceeds adapt.imaging.max_line_integration")
        c = a.curtaining
        if c.enabled and c.min_mill_current_a > self.mill.current_a:
            problems.append("adapt.curtaining.min_mill_current_a exceeds mill.current_a")
        if c.enabled and c.max_polish_passes < self.polish.passes:
            problems.append("adapt.curtaining.max_polish_passes is below polish.passes")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --- loading ----------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _describe(
    source: str, exc: ValidationError, env_names: Mapping[tuple[str, ...], str] | None = None
) -> ConfigError:
    """One line per error, naming the file and key, or the environment variable that set the key:
    `KINTSUGI_MQTT__PORT=abc` must not send the admin hunting through a settings file that is fine."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        env_name = next(
            (name for n in range(len(loc), 0, -1) if (name := (env_names or {}).get(loc[:n]))), None
        )
        where = f"environment {env_name}" if env_name else source
        lines.append(f"{where}: {key}: {_message(err, loc)}")
    return ConfigError("\n".join(lines))


_BOUNDS = {
    "less_than_equal": ("less than or equal to", "le"),
    "less_than": ("less than", "lt"),
    "greater_than_equal": ("greater than or equal to", "ge"),
    "greater_than": ("greater than", "gt"),
}
_UNITS = {"_a": " A", "_m": " m", "_s": " s", "_v": " V", "_k": " K", "_pa": " Pa", "_deg": " deg"}


def _message(err: Any, loc: tuple[str, ...]) -> str:
    """Pydantic's message, except that a bound reads as a physicist writes it: `2.5e-06 A`, not
    `0.0000025` (the unit from the key's SI suffix), with the value that was given."""
    bound = _BOUNDS.get(err["type"])
    limit = (err.get("ctx") or {}).get(bound[1]) if bound else None
    if bound is None or not isinstance(limit, int | float):
        return str(err["msg"])
    unit = next((u for suffix, u in _UNITS.items() if loc and loc[-1].endswith(suffix)), "")
    return f"Input should be {bound[0]} {limit:g}{unit} (got {err['input']!r})"


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_env(
    data: dict[str, Any],
    env: Mapping[str, str],
    prefix: str,
    keys: frozenset[str],
    env_names: dict[tuple[str, ...], str] | None = None,
) -> dict[str, Any]:
    """Overlay `KINTSUGI_<KEY>` / `KINTSUGI_<SECTION>__<KEY>` variables whose first part is a settings key;
    other KINTSUGI_* variables (the simulator's cache and token, say) belong to other programs.
    `env_names` collects which variable set which key, for error messages."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for name, raw in env.items():
        if not name.startswith(prefix):
            continue
        path = name[len(prefix) :].lower().split("__")
        if path[0] not in keys:
            continue
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment {name}: {part} is not a section")
        node[path[-1]] = _env_value(raw)
        if env_names is not None:
            env_names[tuple(path)] = name
    return merged


def _parse(
    model: type[M],
    data: dict[str, Any],
    source: str,
    env_names: Mapping[tuple[str, ...], str] | None = None,
) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _describe(source, exc, env_names) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> DaemonSettings:
    data = _read_toml(path) if path is not None else {}
    env_names: dict[tuple[str, ...], str] = {}
    data = _apply_env(
        data,
        os.environ if env is None else env,
        ENV_PREFIX,
        frozenset(DaemonSettings.model_fields),
        env_names,
    )
    # TOML has no path type: accept strings for Path fields by validating in lax mode for those only.
    return _parse(
        DaemonSettings, _paths_to_objects(data, DaemonSettings), str(path or "environment"), env_names
    )


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return _parse(Recipe, data, source)


def load_recipe(path: Path) -> tuple[Recipe, str]:
    """The recipe and its exact text (stored verbatim in the run directory)."""
    data = _read_toml(path)
    text = path.read_text()
    return _parse(Recipe, data, str(path)), text


def _paths_to_objects(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        ann = field.annotation
        value = out[name]
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = _paths_to_objects(value, ann)
        elif isinstance(value, str) and ann in (Path, Path | None):
            out[name] = Path(value)
    return out
