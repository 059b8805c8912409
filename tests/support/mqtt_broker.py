"""A private Mosquitto per test: `kintsugi_daemon.demo.broker.LocalBroker`, fixed passwords, persistence.

Like Mosquitto's own test suite, never the system broker on 1883. `stop()` is a clean SIGTERM, so the
broker saves its persistence file and persistent sessions (clean_session=False subscribers) survive a
`start()` on the same port: that is what the outage tests and benchmark rely on.
"""

from __future__ import annotations

from pathlib import Path

from kintsugi_daemon.demo.broker import (
    ROLES,
    LocalBroker,
    acl_text,
    free_port,
    mosquitto_binaries,
    mosquitto_paths,
)

__all__ = ["ACL", "MOSQUITTO", "USERS", "Broker", "free_port", "mosquitto_available"]

MOSQUITTO = mosquitto_paths()[0]

USERS: dict[str, str] = {user: f"{user}-secret" for user in ROLES}

ACL = acl_text()


def mosquitto_available() -> bool:
    return mosquitto_binaries() is not None


class Broker(LocalBroker):
    """Mosquitto only (no embedded fallback), the `USERS` passwords, persistence on."""

    def __init__(self, directory: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(directory, port=port, host=host, embedded=False, passwords=USERS, persistence=True)
