"""MQTT topic names and the payload models of DESIGN.md's "Events over MQTT" contract.

Every model is strict (unknown keys, NaN/inf and type coercion refused) because monitoring tools and
operators depend on these payloads and commands move a plasma FIB. `python -m kintsugi_daemon.service.messages
--schemas docs/schemas` regenerates the JSON Schemas published in the docs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

__all__ = [
    "COMMAND_MODELS",
    "SCHEMA_VERSION",
    "TOPIC_PREFIX",
    "VERBS",
    "AbortCommand",
    "Alert",
    "Availability",
    "ClearCommand",
    "Command",
    "CommandReply",
    "Description",
    "Envelope",
    "HaltCommand",
    "Metrics",
    "OutboxRecord",
    "PauseCommand",
    "Progress",
    "ResumeCommand",
    "SliceSummary",
    "StartCommand",
    "Status",
    "StopCommand",
    "Topics",
    "Verb",
    "alert_suffix",
    "envelope_from_outbox",
    "event_suffix",
    "export_schemas",
    "rfc3339",
]

TOPIC_PREFIX: Final = "kintsugi/v1"
SCHEMA_VERSION: Final = 1
EVENT_TYPE_PREFIX: Final = "kintsugi."

# Topic suffixes below the instrument root.
STATUS: Final = "status"
DESCRIPTION: Final = "description"
PROGRESS: Final = "progress"
SLICES_LATEST: Final = "slices/latest"
SLICES_LATEST_PREVIEW: Final = "slices/latest/preview"
METRICS: Final = "metrics"
COMMAND_FILTER: Final = "cmd/+"

# A recipe in the daemon's recipe folder, by name: one file name without extension, no separators, no
# leading dot (so never `..`).
RecipeName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")]
# One topic level: no separators or wildcards, so ids can never widen a subscription or an ACL match.
TopicLevel = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def _check_level(value: str, what: str) -> str:
    if not value or len(value) > 64 or any(c in value for c in "/+#\0") or value.strip() != value:
        raise ValueError(f"{what} {value!r} is not a single MQTT topic level")
    return value


class Topics:
    """Topic names under `kintsugi/v1/<instrument_id>/`."""

    def __init__(self, instrument_id: str) -> None:
        self.instrument_id = _check_level(instrument_id, "instrument_id")
        self.root = f"{TOPIC_PREFIX}/{instrument_id}/"

    def full(self, suffix: str) -> str:
        """Absolute topic for a suffix; an already absolute `kintsugi/v1/...` topic passes through."""
        return suffix if suffix.startswith(f"{TOPIC_PREFIX}/") else self.root + suffix

    def suffix(self, topic: str) -> str | None:
        return topic[len(self.root) :] if topic.startswith(self.root) else None

    @property
    def status(self) -> str:
        return self.root + STATUS

    @property
    def description(self) -> str:
        return self.root + DESCRIPTION

    @property
    def progress(self) -> str:
        return self.root + PROGRESS

    @property
    def slices_latest(self) -> str:
        return self.root + SLICES_LATEST

    @property
    def slices_latest_preview(self) -> str:
        return self.root + SLICES_LATEST_PREVIEW

    @property
    def metrics(self) -> str:
        return self.root + METRICS

    @property
    def commands(self) -> str:
        """Subscription filter for every command verb (not their replies: `+` is one level)."""
        return self.root + COMMAND_FILTER

    def event(self, event_type: str) -> str:
        return f"{self.root}events/{_check_level(event_type, 'event type')}"

    def alert(self, alert_id: str) -> str:
        return f"{self.root}alerts/{_check_level(alert_id, 'alert id')}"

    def command(self, verb: str) -> str:
        return f"{self.root}cmd/{_check_level(verb, 'verb')}"

    def reply(self, verb: str) -> str:
        return f"{self.command(verb)}/reply"


def event_suffix(event_type: str) -> str:
    return f"events/{_check_level(event_type, 'event type')}"


def alert_suffix(alert_id: str) -> str:
    return f"alerts/{_check_level(alert_id, 'alert id')}"


def rfc3339(epoch_s: float) -> str:
    """UTC RFC 3339 timestamp with microseconds, as CloudEvents `time` expects."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


EpochS = Annotated[float, Field(ge=0, description="seconds since the Unix epoch (UTC)")]
JsonScalar = str | int | float | bool | None


# -- events -------------------------------------------------------------------------------------


class OutboxRecord(Protocol):
    """What the publisher needs of one journaled event (journal.OutboxEvent satisfies it)."""

    @property
    def seq(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def run_id(self) -> str | None: ...
    @property
    def session(self) -> str: ...
    @property
    def time(self) -> float: ...
    @property
    def data(self) -> Mapping[str, Any]: ...


class Envelope(_Strict):
    """CloudEvents 1.0 structured-mode JSON for every non-retained event (`events/<type>`)."""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(description="unique per source: `<session>-<seq>`")
    source: str = Field(description="`/kintsugi/v1/<instrument_id>`")
    type: str = Field(pattern=r"^kintsugi\.[A-Za-z0-9_.-]+$", description="`kintsugi.<event type>`")
    time: str = Field(description="RFC 3339, UTC, when the state change was journaled")
    datacontenttype: Literal["application/json"] = "application/json"
    run_id: str | None
    session: str = Field(description="daemon process session; changes on every daemon start")
    seq: int = Field(ge=0, description="gap-free journal sequence number; subscribers dedup on it")
    data: dict[str, Any]


def envelope_from_outbox(event: OutboxRecord, instrument_id: str) -> dict[str, Any]:
    """The JSON-ready envelope of one outbox event."""
    return Envelope(
        id=f"{event.session}-{event.seq}",
        source=f"/{TOPIC_PREFIX}/{_check_level(instrument_id, 'instrument_id')}",
        type=EVENT_TYPE_PREFIX + event.type,
        time=rfc3339(event.time),
        run_id=event.run_id,
        session=event.session,
        seq=event.seq,
        data=dict(event.data),
    ).model_dump(mode="json")


# -- retained state -----------------------------------------------------------------------------

Availability = Literal["online", "offline", "lost"]


class Status(_Strict):
    """`status` (retained). The broker publishes `state: lost` as the Last Will on an unclean drop."""

    state: Availability
    path: str | None = Field(
        default=None, description="state machine path such as `running.mill`; null in the Last Will"
    )
    session: str
    since: EpochS | None = Field(default=None, description="when the machine entered `path`")
    ts: EpochS | None = Field(
        default=None, description="when this status was published; null in the Last Will"
    )
    run_id: str | None = None
    reason: str | None = None


class Description(_Strict):
    """`description` (retained): what this daemon is and can do."""

    instrument_id: str
    version: str
    schema_version: int = SCHEMA_VERSION
    states: list[str]
    detectors: list[str]
    model: str | None = Field(default=None, description="segmentation model name/version, if loaded")
    verbs: list[str] = Field(default_factory=lambda: list(VERBS))


class Progress(_Strict):
    """`progress` (retained)."""

    run_id: str | None
    slice: int = Field(ge=0, description="slices completed")
    total: int | None = Field(default=None, ge=0)
    step: str | None = None
    percent: float = Field(ge=0, le=100)
    eta_s: float | None = Field(default=None, ge=0)
    eta_uncertainty_s: float | None = Field(
        default=None, ge=0, description="one standard deviation of eta_s, from the measured slice periods"
    )
    ts: EpochS | None = None


class Alert(_Strict):
    """`alerts/<id>` (retained while active; cleared with an empty retained payload)."""

    id: TopicLevel
    severity: Literal["info", "warning", "critical"]
    message: str
    since: EpochS
    run_id: str | None = None


class SliceSummary(_Strict):
    """`slices/latest` (retained): the last finished slice."""

    run_id: str
    slice: int = Field(ge=0)
    z_m: float | None = None
    thickness_m: float | None = Field(default=None, gt=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    decisions: dict[str, JsonScalar] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="paths relative to the run directory")
    preview_topic: str | None = None


class Metrics(RootModel[dict[str, float | int | bool]]):
    """`metrics` (QoS 0, not retained): flat numbers for Telegraf/Grafana."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


# -- commands -----------------------------------------------------------------------------------

Verb = Literal["start", "pause", "resume", "stop", "abort", "halt", "clear"]
VERBS: Final[tuple[str, ...]] = get_args(Verb)


class Command(_Strict):
    """Fields every `cmd/<verb>` payload carries."""

    command_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    sent_at: EpochS = Field(description="sender clock; commands too old or from the future are refused")


class StartCommand(Command):
    """Start a run from a recipe given inline (TOML text) or by the name of one in the daemon's recipe
    folder (`recipes_dir`). Never a path: the daemon opens no file an operator names, so a command cannot
    probe which files exist on its machine or read its settings."""

    recipe: str | None = Field(default=None, max_length=60_000)
    recipe_name: RecipeName | None = None

    @model_validator(mode="after")
    def _one_recipe(self) -> StartCommand:
        if (self.recipe is None) == (self.recipe_name is None):
            raise ValueError("give exactly one of recipe (TOML text) or recipe_name")
        return self


class PauseCommand(Command):
    now: bool = Field(default=False, description="true: stop patterning now; false: at the step boundary")


class ResumeCommand(Command):
    pass


class StopCommand(Command):
    pass


class AbortCommand(Command):
    pass


class HaltCommand(Command):
    pass


class ClearCommand(Command):
    alert_id: TopicLevel | None = Field(default=None, description="one alert, or all when omitted")


COMMAND_MODELS: Final[dict[str, type[Command]]] = {
    "start": StartCommand,
    "pause": PauseCommand,
    "resume": ResumeCommand,
    "stop": StopCommand,
    "abort": AbortCommand,
    "halt": HaltCommand,
    "clear": ClearCommand,
}


class CommandReply(_Strict):
    """`cmd/<verb>/reply`: every command gets one, refusals included."""

    command_id: str | None = Field(description="null when the payload was too broken to carry one")
    verb: str
    accepted: bool
    error: str | None = None
    state: str = Field(description="state machine path after handling the command")
    ts: EpochS | None = None


# -- schema export ------------------------------------------------------------------------------

PAYLOAD_MODELS: Final[dict[str, type[BaseModel]]] = {
    "envelope": Envelope,
    "status": Status,
    "description": Description,
    "progress": Progress,
    "alert": Alert,
    "slice_summary": SliceSummary,
    "metrics": Metrics,
    "command_reply": CommandReply,
    **{f"command_{verb}": model for verb, model in COMMAND_MODELS.items()},
}


def export_schemas(directory: Path) -> list[Path]:
    """Write one JSON Schema per payload model into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in PAYLOAD_MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://kintsugi.invalid/schemas/v{SCHEMA_VERSION}/{name}.json"
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kintsugi_daemon.service.messages")
    parser.add_argument("--schemas", type=Path, required=True, help="directory for the JSON Schemas")
    args = parser.parse_args(argv)
    for path in export_schemas(args.schemas):
        print(path)


if __name__ == "__main__":
    main()
