"""`kintsugi serve`: wires journal, instrument client, run controller and MQTT link into one service.

Start-up: open the journal, recover a run a crash left behind (the daemon comes back paused, reason
`recovered`), connect MQTT, then tell systemd READY. The watchdog is fed from a task on the event loop,
so a blocked loop stops feeding it and systemd restarts us. SIGTERM pauses the run at the next step
boundary (the step in progress finishes or is safely stopped), then the daemon says `offline` and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

from kintsugi_daemon import __version__
from kintsugi_daemon.config import DaemonSettings
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.service import profiling
from kintsugi_daemon.service.home_assistant import discovery_messages
from kintsugi_daemon.service.instance_lock import InstanceLock
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.service.messages import (
    SLICES_LATEST_PREVIEW,
    Alert,
    Command,
    CommandReply,
    Description,
    Progress,
    SliceSummary,
    Status,
)
from kintsugi_daemon.service.mqtt_link import MqttLink
from kintsugi_daemon.service.notify import Notifier, Observation
from kintsugi_daemon.service.preview import preview_png
from kintsugi_daemon.service.sdnotify import notify, watchdog_interval_s
from kintsugi_daemon.states.controller import CommandRefused, Controller
from kintsugi_daemon.states.identity import watch_identity
from kintsugi_daemon.states.table import STATES

__all__ = ["Service", "configure_logging", "run_service"]

log = structlog.get_logger("kintsugi.service")

SHUTDOWN_STEP_WAIT_S = 900.0  # how long SIGTERM waits for the step in progress before stopping it


def configure_logging(level: str, json_output: bool) -> None:
    """One log stream: structlog's events and the standard-library records of the MQTT link and of
    libraries go through the same renderer, so with json_output every line is one JSON object."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any = _timed(
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    stamped: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    # Library chatter (every HTTP request, every transition callback) would drown the JSON log.
    for noisy in ("httpx", "httpcore", "transitions"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, numeric))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *stamped,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def _timed(renderer: Any) -> Any:
    """The renderer, its time booked as "logging" when profiling (the overhead benchmark's breakdown)."""

    def render(logger: Any, name: str, event_dict: Any) -> Any:
        with profiling.span("logging"):
            return renderer(logger, name, event_dict)

    return render


class Service:
    def __init__(self, settings: DaemonSettings, *, session: str | None = None) -> None:
        self.settings = settings
        self.session = session or uuid.uuid4().hex[:12]
        settings.data_root.mkdir(parents=True, exist_ok=True)
        self.lock = InstanceLock(settings.journal_file).acquire()  # before the journal is touched
        try:
            self.journal = Journal(settings.journal_file, self.session)
        except BaseException:
            self.lock.release()
            raise
        inst = settings.instrument
        self.instrument = HttpDualBeam(
            inst.url, token=inst.resolved_token(), deadline_scale=inst.deadline_scale
        )
        self.controller = Controller(
            instrument=self.instrument, journal=self.journal, settings=settings, on_change=self._changed
        )
        self.link = MqttLink(
            settings.mqtt,
            settings.instrument_id,
            self.journal,
            status_provider=self._status,
            description_provider=self._description,
            command_handler=self._command,
            progress_provider=self._progress,
            alerts_provider=self._alerts,
        )
        self.notifier = Notifier(settings.notify, settings.instrument_id)
        self._published_alerts: set[str] = set()
        self._last_preview: tuple[str, int] | None = None
        self._retained_dirty = asyncio.Event()
        self._last_slice: dict[str, Any] | None = None
        self._last_metrics: dict[str, Any] | None = None
        self._stopping = asyncio.Event()

    # --- providers for the MQTT link --------------------------------------------------------------

    def _status(self) -> Status:
        c = self.controller
        return Status(
            state="online",
            path=c.state,
            session=self.session,
            since=c.since,
            ts=time.time(),
            run_id=c.run.run_id if c.run else None,
            reason=c.reason,
        )

    def _description(self) -> Description:
        states = [s if isinstance(s, str) else s["name"] for s in STATES]
        run = self.controller.run
        detectors: list[str] = list(run.recipe.imaging.detectors) if run else []
        return Description(
            instrument_id=self.settings.instrument_id,
            version=__version__,
            states=states,
            detectors=detectors,
            model=None,
        )

    def _progress(self) -> Progress | None:
        p = self.controller.progress()
        return None if p is None else Progress(ts=time.time(), **p)

    def _alerts(self) -> list[Alert]:
        return [Alert(**a) for a in self.controller.alerts.values()]

    async def _command(self, verb: str, command: Command) -> CommandReply:
        args = command.model_dump(exclude={"command_id", "sent_at"})
        if verb == "start":
            name = args.pop("recipe_name", None)
            if name is not None:
                try:
                    args["recipe"] = self._named_recipe(name)
                except LookupError as exc:
                    return self._reply(command, verb, str(exc))
        try:
            await self.controller.command(verb, args)
        except CommandRefused as exc:
            return self._reply(command, verb, str(exc))
        return self._reply(command, verb, None)

    def _named_recipe(self, name: str) -> str:
        """The text of `<recipes_dir>/<name>.toml`. The name was checked to be one plain file name; the
        messages say nothing about the machine beyond the configured folder."""
        folder = self.settings.recipes_dir
        if folder is None:
            raise LookupError("recipe_name needs a recipe folder (recipes_dir) in the daemon's settings")
        try:
            return (folder / f"{name}.toml").read_text()
        except (OSError, UnicodeDecodeError):
            raise LookupError(f"no readable recipe named {name!r} in the daemon's recipe folder") from None

    def _reply(self, command: Command, verb: str, error: str | None) -> CommandReply:
        return CommandReply(
            command_id=command.command_id,
            verb=verb,
            accepted=error is None,
            error=error,
            state=self.controller.state,
            ts=time.time(),
        )

    # --- change propagation -----------------------------------------------------------------------

    def _changed(self) -> None:
        self.link.notify()
        self._retained_dirty.set()
        c = self.controller
        p = c.progress()
        where = f"slice {p['slice']}/{p['total']} {p['step'] or ''}" if p else ""
        notify(status=f"{c.state} {where}".strip())
        self.notifier.observe(self._observation())

    def _observation(self) -> Observation:
        c = self.controller
        p = c.progress()
        return Observation(
            state=c.state,
            run_id=c.run.run_id if c.run else None,
            alerts=dict(c.alerts),
            slice=p["slice"] if p else None,
            total=p["total"] if p else None,
            overlay=self._overlay_path(),
        )

    def _overlay_path(self) -> Path | None:
        """The latest slice's overlay PNG on disk, if it has one (also once its run has ended: the last
        slice's segmentation often finishes after the run's last step)."""
        latest = self.controller.latest_slice or {}
        rel = latest.get("files", {}).get("overlay")
        return self.settings.data_root / str(latest["run_id"]) / rel if rel and latest.get("run_id") else None

    async def _retained_publisher(self) -> None:
        """The one publisher of the retained topics. A state change marks them dirty; a burst of changes
        goes out once, in order, never twice at once (concurrent publishers each sent an alert 2-4 times);
        a change made while the link connects goes out once it is up, not lost."""
        while True:
            await self._retained_dirty.wait()
            self._retained_dirty.clear()
            await self.link.wait_connected()
            try:
                await self._publish_retained_now()
            except Exception:  # a bad payload must not stop the daemon; the next change retries
                log.exception("retained topics not published")

    async def _publish_retained_now(self) -> None:
        if not self.link.connected:
            return  # re-asserted from the providers on the next connect
        await self.link.publish_status()
        progress = self._progress()
        if progress is not None:
            await self.link.publish_progress(progress)
        current = set(self.controller.alerts)
        for alert in self._alerts():
            if alert.id not in self._published_alerts:
                await self.link.publish_alert(alert)
        for gone in self._published_alerts - current:
            await self.link.clear_alert(gone)
        self._published_alerts = current
        metrics = self.controller.last_metrics
        if metrics and metrics is not self._last_metrics:
            self._last_metrics = metrics
            flat = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            await self.link.publish_metrics(flat)  # QoS 0, for Telegraf/Grafana
        latest = self.controller.latest_slice
        if latest is not None and latest is not self._last_slice:
            self._last_slice = latest
            preview_topic = await self._publish_preview(latest)
            await self.link.publish_retained(
                "slices/latest", SliceSummary(**latest, preview_topic=preview_topic)
            )

    async def _publish_preview(self, latest: dict[str, Any]) -> str | None:
        """The slice's overlay, small, on `slices/latest/preview` for pages and phones that cannot read
        the run directory. Sent before the summary that names it; once per slice."""
        overlay = self._overlay_path()
        if overlay is None:
            return None
        identity = (str(latest["run_id"]), int(latest["slice"]))
        if identity != self._last_preview:
            try:
                png = await asyncio.to_thread(preview_png, overlay, *identity)
            except OSError as exc:
                log.warning("preview not published", path=str(overlay), error=str(exc))
                return None
            self._last_preview = identity
            await self.link.publish_retained_bytes(SLICES_LATEST_PREVIEW, png)
        return self.link.topics.slices_latest_preview

    # --- lifecycle --------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            notify(watchdog="1")  # sent only while the loop runs: a stuck loop stops feeding it
            await asyncio.sleep(interval)

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_shutdown)
        await self.controller.boot()
        ha = self.settings.home_assistant
        if ha.discovery:  # retained, re-asserted by the link on every connect
            configs = discovery_messages(self.settings.instrument_id, ha.prefix, __version__)
            for topic, config in configs.items():
                await self.link.publish_retained_bytes(topic, config, absolute=True)
        try:
            async with asyncio.TaskGroup() as tg:
                link_task = tg.create_task(self.link.run(), name="mqtt")
                notifier = tg.create_task(self.notifier.run(), name="notify")
                watchdog = tg.create_task(self._watchdog(), name="watchdog")
                retained = tg.create_task(self._retained_publisher(), name="retained")
                # A wrong instrument token or URL is an alert now, not when a run is started.
                url, alerts = self.settings.instrument.url, self.controller.alert_board
                identity = tg.create_task(watch_identity(self.instrument, url, alerts), name="identity")
                notify(ready="1", status=f"{self.controller.state}")
                log.info("ready", state=self.controller.state, session=self.session)
                await self._stopping.wait()
                notify(stopping="1")
                await self.controller.shutdown(SHUTDOWN_STEP_WAIT_S)
                self.link.close()  # drains the outbox, then publishes `offline` before disconnecting
                await link_task
                watchdog.cancel()
                retained.cancel()
                identity.cancel()
                await self.notifier.flush(self.settings.notify.timeout_s)
                notifier.cancel()
        finally:
            self.notifier.close()
            await self.controller.close()
            await self.instrument.aclose()
            self.journal.close()
            self.lock.release()
            log.info("stopped")


async def run_service(settings: DaemonSettings) -> None:
    profile = profiling.enable_from_env()  # $KINTSUGI_PROFILE: where the benchmark wants the spans
    try:
        await Service(settings).run()
    finally:
        if profile is not None:
            profiling.dump(profile)
