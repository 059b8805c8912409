"""A private Mosquitto per test: `kintsugi_daemon.demo.broker.LocalBroker` with fixed passwords and
persistence.

Like Mosquitto's own test suite, never the system broker on 1883. `stop()` is a clean SIGTERM, so the
broker saves its persistence file and persistent sessions (clean_session=False subscribers) survive a
`start()` on the same port: that is what the outage tests and benchmark rely on.

Users as in production: each daemon's user name is its instrument id (pass the test's instrument ids),
plus an `operator` and a `monitor` granted every instrument unless `access` says otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from kintsugi_daemon.demo.broker import (
    Access,
    LocalBroker,
    free_port,
    mosquitto_binaries,
    mosquitto_paths,
)

__all__ = ["MOSQUITTO", "Broker", "free_port", "mosquitto_available", "secret"]

MOSQUITTO = mosquitto_paths()[0]


def secret(user: str) -> str:
    """Every test broker's password for `user`."""
    return f"{user}-secret"


def mosquitto_available() -> bool:
    return mosquitto_binaries() is not None


class Broker(LocalBroker):
    """Mosquitto only (no embedded fallback), `secret(user)` passwords, persistence on."""

    def __init__(
        self,
        directory: Path,
        instruments: Iterable[str] = (),
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        access: Access | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        access = access or Access.single_site(instruments)
        super().__init__(
            directory,
            port=port,
            host=host,
            embedded=False,
            access=access,
            passwords={user: secret(user) for user in access.users},
            persistence=True,
            tls=tls,
        )
