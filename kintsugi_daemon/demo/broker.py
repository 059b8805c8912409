"""A private MQTT broker on a free loopback port, for `kintsugi demo` and tests.

Mosquitto when the binary is installed, with its own config, password file and ACL in a folder of its
own (never the system broker on 1883). Without it, an embedded amqtt broker run as a separate process
(`python -m kintsugi_daemon.demo.broker --embedded ...`) with the same users and ACL, so the daemon and its
operators are real MQTT clients over TCP either way.

Users and ACL as in production (`broker_acl.Access`, deploy/mosquitto/kintsugi.acl): each daemon's user
name is its instrument id and it writes only that instrument's topic tree; an operator writes commands to
the instruments granted to them; a monitor only reads. By default one `operator` and one `monitor` are
granted every instrument given.

With `persistence=True` (Mosquitto only; the tests and benchmarks use it) `stop()` is a clean SIGTERM, so
the broker saves its persistence file and persistent sessions (clean_session=False subscribers, with
everything queued for them) survive a `start()` on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

from kintsugi_daemon.demo.broker_acl import Access, acl_text, amqtt_rules

__all__ = [
    "Access",
    "BrokerError",
    "LocalBroker",
    "acl_text",
    "child_preexec",
    "free_port",
    "mosquitto_binaries",
    "mosquitto_paths",
]

BrokerKind = Literal["mosquitto", "embedded"]

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The broker could not be started (the message carries its log's tail)."""


def mosquitto_paths() -> tuple[str, str]:
    """Where (mosquitto, mosquitto_passwd) are, or would be: on PATH, else Debian's locations."""
    return (
        shutil.which("mosquitto") or "/usr/sbin/mosquitto",
        shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd",
    )


def mosquitto_binaries() -> tuple[str, str] | None:
    """(mosquitto, mosquitto_passwd) when both are installed and executable, else None."""
    broker, passwd = mosquitto_paths()
    if os.access(broker, os.X_OK) and os.access(passwd, os.X_OK):
        return broker, passwd
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def child_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A preexec_fn for helper processes: own session (a terminal's Ctrl-C reaches only the parent,
    which shuts its children down in order) and, on Linux, SIGTERM when the parent dies.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits: spawn from the main thread."""
    if not sys.platform.startswith("linux"):
        return os.setsid
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it

    def preexec() -> None:
        os.setsid()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class LocalBroker:
    """One private broker: `start()` (or `start_async()`), `stop()` (clean SIGTERM) or `kill()`; also a
    context manager. It may be started again after `stop()`, on the same port.

    `instruments` are the daemons' identities (user name = instrument id); `access` replaces the default
    policy (those instruments, an `operator` and a `monitor` for all of them). `passwords` fixes each
    user's password (default: random per broker). `persistence` keeps sessions
    and queued messages across a stop()/start() and lifts Mosquitto's queue limits, so an outage of any
    length loses nothing for a persistent subscriber; it needs Mosquitto."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        embedded: bool | None = None,
        instruments: Iterable[str] = (),
        access: Access | None = None,
        passwords: Mapping[str, str] | None = None,
        persistence: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.access = access or Access.single_site(instruments)
        self.directory = Path(directory)
        self.host = host
        self._fixed_port = port
        self.port = port or free_port(host)
        binaries = None if embedded else mosquitto_binaries()
        if embedded is False and binaries is None:
            raise BrokerError("mosquitto is not installed (mosquitto and mosquitto_passwd)")
        self._binaries = binaries
        self.kind: BrokerKind = "mosquitto" if binaries else "embedded"
        if persistence and self.kind == "embedded":
            raise BrokerError("persistence needs mosquitto (mosquitto and mosquitto_passwd)")
        self.persistence = persistence
        if tls is not None and self.kind == "embedded":
            raise BrokerError("tls needs mosquitto (mosquitto and mosquitto_passwd)")
        self.tls = tls  # (certificate chain, private key) in PEM: the listener speaks MQTT over TLS only
        # Random per broker: nothing outside this folder and the caller can talk to it.
        self.passwords = dict(passwords or {user: secrets.token_urlsafe(16) for user in self.access.users})
        missing = [user for user in self.access.users if user not in self.passwords]
        if missing:
            raise BrokerError(f"no password for broker user {missing[0]!r}")
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # --- what clients need -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def credentials(self, user: str) -> tuple[str, str]:
        """(user, password); a daemon's user is its instrument id."""
        return user, self.passwords[user]

    @property
    def log_path(self) -> Path:
        return self.directory / "broker.log"

    @property
    def config(self) -> Path:
        """The broker's config file (written by `start()`)."""
        return self.directory / ("mosquitto.conf" if self.kind == "mosquitto" else "amqtt.json")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 15.0) -> None:
        """Write the config, start the broker and wait (bounded) until its port accepts connections.

        The port is picked free before the broker binds it; if another process takes it meanwhile, the
        broker exits and a new port is tried (unless the caller fixed the port, or clients already know
        it from an earlier start)."""
        for attempt in range(3):
            self._spawn(self._write_config())
            try:
                deadline = time.monotonic() + timeout_s
                while not _accepts(self.host, self.port):
                    self._check_starting(deadline, timeout_s)
                    time.sleep(0.02)
                break
            except BrokerError:
                if not self._retry_on_new_port(attempt):
                    raise
        self._fixed_port = self.port

    async def start_async(self, timeout_s: float = 15.0) -> None:
        """`start()` without blocking the event loop (clients in the same loop keep running)."""
        for attempt in range(3):
            # The files are written off the loop; the process is spawned on this (the main) thread,
            # since PR_SET_PDEATHSIG fires when the forking thread exits.
            self._spawn(await asyncio.to_thread(self._write_config))
            try:
                deadline = time.monotonic() + timeout_s
                while not await asyncio.to_thread(_accepts, self.host, self.port):
                    self._check_starting(deadline, timeout_s)
                    await asyncio.sleep(0.02)
                break
            except BrokerError:
                if not self._retry_on_new_port(attempt):
                    raise
        self._fixed_port = self.port

    def _spawn(self, command: list[str]) -> None:
        if self.running:
            raise BrokerError("broker already running")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=child_preexec(os.getpid()),
        )

    def _check_starting(self, deadline: float, timeout_s: float) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BrokerError(
                f"{self.kind} broker exited with status {self.process.returncode}: {self._log_tail()}"
            )
        if time.monotonic() > deadline:
            raise BrokerError(
                f"{self.kind} broker not listening on {self.host}:{self.port} after {timeout_s:g} s: "
                f"{self._log_tail()}"
            )

    def _retry_on_new_port(self, attempt: int) -> bool:
        """After a failed start: stop, and pick a new port when another process took this one."""
        lost_port = (
            self.process is not None and self.process.poll() is not None and "in use" in self._log_tail()
        )
        self.stop()
        if not lost_port or self._fixed_port is not None or attempt == 2:
            return False
        self.port = free_port(self.host)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Clean SIGTERM (SIGKILL if it does not exit in time); idempotent."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    # --- configuration ---------------------------------------------------------------------------

    def _write_config(self) -> list[str]:
        if self.running:
            raise BrokerError("broker already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._binaries is not None:
            return self._write_mosquitto(*self._binaries)
        return self._write_embedded()

    def _write_mosquitto(self, mosquitto: str, mosquitto_passwd: str) -> list[str]:
        passwd = self.directory / "passwd"
        passwd.unlink(missing_ok=True)
        passwd.touch(mode=0o600)
        for user, password in self.passwords.items():
            subprocess.run(
                [mosquitto_passwd, "-b", str(passwd), user, password], check=True, capture_output=True
            )
        acl = self.directory / "acl"
        acl.write_text(acl_text(self.access))
        if self.persistence:
            persistence = (
                f"persistence true\npersistence_location {self.directory}/\n"
                # Queue everything for offline persistent subscribers: a long outage must not overflow.
                # Not `max_queued_messages 0` (unlimited): Mosquitto 2.0.11 then drops any client whose
                # QoS 1 publish the ACL denies, which the security tests and drills do on purpose.
                "max_queued_messages 1000000\nmax_inflight_messages 0\n"
            )
        else:
            persistence = "persistence false\n"
        tls = f"certfile {self.tls[0]}\nkeyfile {self.tls[1]}\n" if self.tls else ""
        self.config.write_text(
            f"listener {self.port} {self.host}\n"
            f"{tls}"
            "allow_anonymous false\n"
            # Small packets (events, commands) leave at once, as with deploy/mosquitto/kintsugi.conf.
            "set_tcp_nodelay true\n"
            f"password_file {passwd}\n"
            f"acl_file {acl}\n"
            f"{persistence}"
            # As root, mosquitto would otherwise drop to the `mosquitto` user, who cannot read our files.
            f"user {_user_name()}\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        return [mosquitto, "-c", str(self.config)]

    def _write_embedded(self) -> list[str]:
        from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's dependency: its file plugin reads argon2

        hasher = Argon2Hasher()
        passwd = self.directory / "passwd"
        passwd.write_text("".join(f"{u}:{hasher.hash(p)}\n" for u, p in self.passwords.items()))
        passwd.chmod(0o600)
        config = _amqtt_config(self.host, self.port, passwd, self.access)
        self.config.write_text(json.dumps(config, indent=1))
        return [
            sys.executable,
            "-m",
            "kintsugi_daemon.demo.broker",
            "--embedded",
            "--config",
            str(self.config),
        ]


def _user_name() -> str:
    import getpass

    return getpass.getuser()


def _amqtt_config(host: str, port: int, passwd: Path, access: Access) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwd)},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": amqtt_rules(access),
        },
    }


# --- the embedded broker's own process ---------------------------------------------------------------


async def _serve_embedded(config_path: Path) -> None:
    from amqtt.broker import Broker  # type: ignore[import-untyped]

    config = json.loads(config_path.read_text())
    broker = Broker(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    print(f"embedded amqtt broker listening on {config['listeners']['default']['bind']}", flush=True)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kintsugi_daemon.demo.broker", description=__doc__)
    p.add_argument("--embedded", action="store_true", required=True, help="run the amqtt broker")
    p.add_argument("--config", type=Path, required=True, help="amqtt config JSON written by LocalBroker")
    args = p.parse_args(argv)
    asyncio.run(_serve_embedded(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
