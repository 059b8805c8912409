"""The instrument checked at boot: a wrong token or URL raises an alert at once, not when a run starts
hours later. The check repeats while it fails (the bridge PC may still be booting) and clears the alert
when the instrument answers."""

from __future__ import annotations

import asyncio

import structlog

from kintsugi_daemon.drivers.base import DualBeam, InstrumentError, Unauthorized
from kintsugi_daemon.states.alerts import Alerts

__all__ = ["IDENTITY_ALERT", "watch_identity"]

IDENTITY_ALERT = "instrument"
RETRY_S = 30.0
DEADLINE_S = 10.0

log = structlog.get_logger("kintsugi.controller")


def _advice(url: str, exc: InstrumentError) -> str:
    if isinstance(exc, Unauthorized):
        return (
            f"the instrument at {url} refused the token ({exc}): check [instrument] token or token_file "
            "(KINTSUGI_INSTRUMENT__TOKEN) against the bridge's or simulator's token"
        )
    return (
        f"the instrument at {url} does not answer ({type(exc).__name__}: {exc}): check [instrument] url "
        "(KINTSUGI_INSTRUMENT__URL) and that the bridge or simulator is running"
    )


async def watch_identity(instrument: DualBeam, url: str, alerts: Alerts, retry_s: float = RETRY_S) -> None:
    """Until the instrument says who it is: an alert while it does not, cleared once it does."""
    while True:
        try:
            identity = await instrument.identity(deadline_s=DEADLINE_S)
        except InstrumentError as exc:
            message = _advice(url, exc)
            current = alerts.active.get(IDENTITY_ALERT)
            if current is None or current["message"] != message:
                alerts.raise_(IDENTITY_ALERT, "critical", message)
            await asyncio.sleep(retry_s)
            continue
        log.info("instrument", **identity.model_dump())
        alerts.clear(IDENTITY_ALERT)
        return
