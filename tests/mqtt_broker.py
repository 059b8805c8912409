"""A private Mosquitto per test: own config, password file and ACL, on a free loopback port.

Like Mosquitto's own test suite, never the system broker on 1883. `stop()` is a clean SIGTERM, so the
broker saves its persistence file and persistent sessions (clean_session=False subscribers) survive a
`start()` on the same port: that is what the outage tests and benchmark rely on.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["ACL", "MOSQUITTO", "USERS", "Broker", "free_port", "mosquitto_available"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

USERS: dict[str, str] = {
    "daemon": "daemon-secret",
    "monitor": "monitor-secret",
    "operator": "operator-secret",
}

# The daemon writes exactly its own topic tree and reads commands; a monitor only reads; an operator
# reads everything and writes commands (not their replies: those come from the daemon alone).
ACL = """\
user daemon
topic write kintsugi/v1/+/status
topic write kintsugi/v1/+/description
topic write kintsugi/v1/+/progress
topic write kintsugi/v1/+/events/#
topic write kintsugi/v1/+/slices/#
topic write kintsugi/v1/+/metrics
topic write kintsugi/v1/+/alerts/#
topic write kintsugi/v1/+/cmd/+/reply
topic read kintsugi/v1/+/cmd/+

user monitor
topic read kintsugi/v1/#

user operator
topic read kintsugi/v1/#
topic write kintsugi/v1/+/cmd/+
"""


def mosquitto_available() -> bool:
    return os.access(MOSQUITTO, os.X_OK) and os.access(MOSQUITTO_PASSWD, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    directory: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        passwd = self.directory / "passwd"
        passwd.touch(mode=0o600)
        for user, password in USERS.items():
            subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True)
        (self.directory / "acl").write_text(ACL)
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {self.directory / 'acl'}\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            # Queue everything for offline persistent subscribers: a 30 s outage must not overflow.
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"user {getpass.getuser()}\n"  # as root, mosquitto would otherwise drop to `mosquitto`
            "log_type error\nlog_type warning\nlog_type notice\n"
        )

    @property
    def config(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self) -> None:
        if self.running:
            raise RuntimeError("broker already running")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)], stdout=self._log, stderr=subprocess.STDOUT
        )

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"mosquitto exited with {self.process.returncode}: {self.log_path.read_text()}"
            )

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and wait (bounded) until the listener accepts connections."""
        self._spawn()
        deadline = time.monotonic() + timeout_s
        while not _accepts(self.host, self.port):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto not listening on {self.port} after {timeout_s} s")
            time.sleep(0.02)

    async def start_async(self, timeout_s: float = 10.0) -> None:
        """`start()` without blocking the event loop (clients in the same loop keep running)."""
        self._spawn()
        async with asyncio.timeout(timeout_s):
            while not await asyncio.to_thread(_accepts, self.host, self.port):
                self._check_alive()
                await asyncio.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean SIGTERM: the broker writes its persistence file (sessions, queued messages)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout_s)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()
