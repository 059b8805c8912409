"""Operator alerts: raised and cleared with an event each, kept while active for the status topic."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from kintsugi_daemon.service.journal import EventDraft, Journal

__all__ = ["Alerts"]

log = structlog.get_logger("kintsugi.controller")


class Alerts:
    def __init__(
        self, journal: Journal, run_id: Callable[[], str | None], on_change: Callable[[], None]
    ) -> None:
        self.active: dict[str, dict[str, Any]] = {}
        self._journal = journal
        self._run_id = run_id
        self._on_change = on_change

    def raise_(self, alert_id: str, severity: str, message: str) -> None:
        run_id = self._run_id()
        self.active[alert_id] = {
            "id": alert_id,
            "severity": severity,
            "message": message,
            "since": time.time(),
            "run_id": run_id,
        }
        self._journal.publish([EventDraft("alert_raised", self.active[alert_id], run_id=run_id)])
        log.warning("alert", **self.active[alert_id])
        self._on_change()

    def clear(self, alert_id: str) -> None:
        if self.active.pop(alert_id, None) is not None:
            self._journal.publish([EventDraft("alert_cleared", {"id": alert_id}, run_id=self._run_id())])
            self._on_change()
