"""What the page knows: one MQTT subscription over every instrument on the broker, folded into a view per
instrument, and fanned out to the browsers as small JSON updates (server-sent events).

The page never talks MQTT itself: `kintsugi web` subscribes once (as the read-only `monitor` by default)
and each browser gets a snapshot on connect, then deltas. Slice history comes from the run directory
when this machine has it (the whole run, even one started before the page), else from what arrived over
MQTT since the page started; overlays likewise from disk or from the `slices/latest/preview` topic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt

from kintsugi_daemon.service import mqtt_client
from kintsugi_daemon.service.messages import TOPIC_PREFIX
from kintsugi_daemon.service.preview import preview_identity

__all__ = ["Hub", "InstrumentView", "MqttAccess"]

log = logging.getLogger(__name__)

EVENTS_KEPT: Final = 200
PREVIEWS_KEPT: Final = 96  # per instrument; about 30 MB at worst
CLIENT_QUEUE: Final = 1000  # updates buffered per browser before it is told to resync


@dataclass(frozen=True)
class MqttAccess:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool = False
    ca_file: Path | None = None

    def client(self, identifier: str, timeout_s: float = 10.0) -> aiomqtt.Client:
        tls = (
            aiomqtt.TLSParameters(ca_certs=str(self.ca_file) if self.ca_file else None) if self.tls else None
        )
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            tls_params=tls,
            timeout=timeout_s,
            socket_options=mqtt_client.NO_DELAY,
        )


@dataclass
class InstrumentView:
    """One daemon as seen from its topics (plus its run directory when local)."""

    id: str
    status: dict[str, Any] | None = None
    description: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    latest: dict[str, Any] | None = None
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: str | None = None
    slices: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    seen: deque[tuple[str, int]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT * 4))
    previews: OrderedDict[tuple[str, int], bytes] = field(default_factory=OrderedDict)

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "description": self.description,
            "progress": self.progress,
            "latest": self.latest,
            "alerts": self.alerts,
            "run_id": self.run_id,
            "slices": [self.slices[k] for k in sorted(self.slices)],
            "events": list(self.events),
        }


def _json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": payload[:200].decode("utf-8", "replace")}


class Hub:
    """Subscribes, folds messages into views, and serves subscribers (`updates()`)."""

    def __init__(self, access: MqttAccess, runs_dir: Path | None, instruments: list[str]) -> None:
        self.access = access
        self.runs_dir = runs_dir
        self.only = set(instruments)
        self.views: dict[str, InstrumentView] = {}
        self.connected = asyncio.Event()
        self.error: str | None = None  # the broker's last refusal, shown on the page
        self._clients: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._next_client = 0

    # -- MQTT --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe and fold messages in until cancelled; reconnect after a broker outage."""
        delay = 0.5
        while True:
            try:
                async with self.access.client(f"kintsugi-web-{uuid.uuid4().hex[:8]}") as client:
                    filters = [f"{TOPIC_PREFIX}/{i}/#" for i in sorted(self.only)] or [f"{TOPIC_PREFIX}/+/#"]
                    for topic_filter in filters:
                        await mqtt_client.call(client.subscribe(topic_filter, qos=1))
                    self.error, delay = None, 0.5
                    self.connected.set()
                    self._broadcast({"kind": "broker", "connected": True, "error": None})
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.apply(str(message.topic), payload)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.error = str(exc)
                self._broadcast({"kind": "broker", "connected": False, "error": self.error})
                log.warning("web: mqtt %s; reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def apply(self, topic: str, payload: bytes) -> None:
        """Fold one message into its instrument's view and tell the browsers what changed."""
        parts = topic.split("/", 3)
        if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != TOPIC_PREFIX:
            return
        instrument, suffix = parts[2], parts[3]
        if self.only and instrument not in self.only:
            return
        view = self.views.get(instrument)
        if view is None:
            view = self.views[instrument] = InstrumentView(instrument)
            self._broadcast({"kind": "instrument", "id": instrument, "view": view.snapshot()})
        if suffix == "slices/latest/preview":
            self._preview(view, payload)
            return
        if suffix.startswith("cmd/"):
            return  # commands and replies are not the page's business (an operator's own come back)
        data = _json(payload)
        if suffix.startswith("events/"):
            if isinstance(data, dict):
                self._event(view, data)
        elif suffix.startswith("alerts/"):
            alert_id = suffix.removeprefix("alerts/")
            if isinstance(data, dict):
                view.alerts[alert_id] = data
            else:
                view.alerts.pop(alert_id, None)
            self._send(view, {"kind": "alert", "alert_id": alert_id, "value": view.alerts.get(alert_id)})
        else:
            self._retained(view, suffix, data)

    def _retained(self, view: InstrumentView, suffix: str, data: Any) -> None:
        if suffix in ("status", "description", "progress"):
            setattr(view, suffix, data)
            self._patch(view, suffix, data)
            run_id = data.get("run_id") if isinstance(data, dict) and suffix != "description" else None
            if run_id:
                self._follow_run(view, str(run_id))
        elif suffix == "slices/latest" and isinstance(data, dict):
            view.latest = data
            self._patch(view, "latest", data)
            if data.get("run_id"):
                self._follow_run(view, str(data["run_id"]))
            self._slice(view, int(data.get("slice", -1)), data)

    def _patch(self, view: InstrumentView, name: str, value: Any) -> None:
        self._send(view, {"kind": "patch", "field": name, "value": value})

    def _event(self, view: InstrumentView, envelope: dict[str, Any]) -> None:
        key = (str(envelope.get("session")), int(envelope.get("seq", -1)))
        if key in view.seen:
            return  # QoS 1 may repeat an event; (session, seq) identifies it
        view.seen.append(key)
        view.events.append(envelope)
        self._send(view, {"kind": "event", "value": envelope})
        data = envelope.get("data") or {}
        kind = str(envelope.get("type", "")).removeprefix("kintsugi.")
        # The run is followed from the retained progress and slices/latest; an event of another run
        # (one refused at preflight, say) goes to the log only.
        if envelope.get("run_id") != view.run_id:
            return
        if kind == "segmented" and isinstance(data.get("slice"), int):
            metrics = {k: v for k, v in data.items() if k not in ("slice", "inference_s")}
            self._slice(view, data["slice"], {"metrics": metrics})
        elif kind == "slice_completed" and isinstance(data.get("slice"), int):
            self._slice(view, data["slice"], {"z_m": data.get("face_position_m")})
        elif kind == "adapted" and isinstance(data.get("slice"), int):
            self._slice(view, data["slice"], {"decisions": data.get("decisions", {})})

    def _slice(self, view: InstrumentView, index: int, update: dict[str, Any]) -> None:
        if index < 0:
            return
        row = view.slices.setdefault(index, {"slice": index, "metrics": {}, "decisions": {}, "files": {}})
        for key in ("z_m", "thickness_m"):
            if update.get(key) is not None:
                row[key] = update[key]
        for key in ("metrics", "decisions", "files"):
            if update.get(key):
                row[key] = {**row[key], **update[key]}
        row["overlay"] = self._has_overlay(view, row)
        self._send(view, {"kind": "slice", "value": row})

    def _preview(self, view: InstrumentView, png: bytes) -> None:
        identity = preview_identity(png) if png else None
        if identity is None:
            return
        view.previews[identity] = png
        view.previews.move_to_end(identity)
        while len(view.previews) > PREVIEWS_KEPT:
            view.previews.popitem(last=False)
        run_id, index = identity
        self._follow_run(view, run_id)
        self._slice(view, index, {})

    # -- the run directory -----------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path | None:
        if self.runs_dir is None or not run_id or "/" in run_id or run_id.startswith("."):
            return None
        path = self.runs_dir / run_id
        return path if path.is_dir() else None

    def overlay_file(self, view: InstrumentView, index: int) -> Path | None:
        row = view.slices.get(index)
        run_dir = self.run_dir(view.run_id or "")
        rel = (row or {}).get("files", {}).get("overlay") or f"previews/{index:04d}_overlay.png"
        if run_dir is None:
            return None
        path = (run_dir / rel).resolve()
        if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
            return None
        return path

    def _has_overlay(self, view: InstrumentView, row: dict[str, Any]) -> bool:
        index = int(row["slice"])
        return (view.run_id or "", index) in view.previews or self.overlay_file(view, index) is not None

    def _follow_run(self, view: InstrumentView, run_id: str) -> None:
        """A new run on this instrument: start its history afresh, from disk when it is here."""
        if view.run_id == run_id:
            return
        view.run_id = run_id
        view.slices = {}
        run_dir = self.run_dir(run_id)
        if run_dir is not None:
            for row in _slices_on_disk(run_dir):
                row["overlay"] = self.overlay_file(view, int(row["slice"])) is not None
                view.slices[int(row["slice"])] = row
        self._broadcast({"kind": "instrument", "id": view.id, "view": view.snapshot()})

    # -- browsers ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": "snapshot",
            "broker": {"connected": self.connected.is_set(), "error": self.error},
            "instruments": {k: v.snapshot() for k, v in sorted(self.views.items())},
        }

    def _send(self, view: InstrumentView, update: dict[str, Any]) -> None:
        self._broadcast({**update, "id": view.id})

    def _broadcast(self, update: dict[str, Any]) -> None:
        for queue in self._clients.values():
            try:
                queue.put_nowait(update)
            except asyncio.QueueFull:
                # A browser too slow to keep up gets a fresh snapshot instead of a gap.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"kind": "resync"})

    async def updates(self) -> AsyncGenerator[dict[str, Any]]:
        """The snapshot, then every update, until the consumer stops iterating."""
        key = self._next_client
        self._next_client += 1
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(CLIENT_QUEUE)
        self._clients[key] = queue
        try:
            yield self.snapshot()
            while True:
                update = await queue.get()
                yield self.snapshot() if update["kind"] == "resync" else update
        finally:
            self._clients.pop(key, None)


def _slices_on_disk(run_dir: Path) -> list[dict[str, Any]]:
    """Rows for the plots from `slices/NNNN.json` and `NNNN.segmentation.json` (unreadable ones skipped:
    a slice being written has no record yet, which is how storage marks it incomplete)."""
    rows: dict[int, dict[str, Any]] = {}
    slices = run_dir / "slices"
    if not slices.is_dir():
        return []
    for path in sorted(slices.glob("[0-9][0-9][0-9][0-9].json")):
        try:
            record = json.loads(path.read_text())
            index = int(record["index"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        meta = record.get("metadata") or {}
        rows[index] = {
            "slice": index,
            "z_m": meta.get("face_position_m"),
            "metrics": {},
            "decisions": {},
            "files": dict(record.get("files") or {}),
        }
    for path in sorted(slices.glob("[0-9][0-9][0-9][0-9].segmentation.json")):
        try:
            record = json.loads(path.read_text())
            index = int(record["index"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if index in rows:
            rows[index]["metrics"] = dict(record.get("metrics") or {})
            rows[index]["files"].update(record.get("files") or {})
    return [rows[k] for k in sorted(rows)]
