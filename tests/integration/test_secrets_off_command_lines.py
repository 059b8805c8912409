"""No secret on a command line (every local user can read /proc/*/cmdline): the simulator's token and the
operator's password come from files, the environment or a prompt; a missing or empty secret file stops
the program with the file named instead of serving unauthenticated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kintsugi_daemon.drivers.base import Unauthorized
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from tests.support.simulator import SimStarter

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "kintsugi-sim.service"


def sim_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},  # no KINTSUGI_SIM_TOKEN inherited
    )


def test_simulator_refuses_a_token_on_its_command_line() -> None:
    proc = sim_serve("--token", "s3cret")
    assert proc.returncode == 2 and "--token-file" in proc.stderr and "KINTSUGI_SIM_TOKEN" in proc.stderr
    assert "s3cret" not in proc.stderr


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_simulator_refuses_a_missing_or_empty_token_file(tmp_path: Path, content: str | None) -> None:
    token_file = tmp_path / "sim.token"
    if content is not None:
        token_file.write_text(content)
    proc = sim_serve("--token-file", str(token_file))
    assert proc.returncode == 2
    assert f"--token-file: {'cannot read' if content is None else ''}" in proc.stderr
    assert str(token_file) in proc.stderr


async def test_simulator_serves_with_the_token_from_its_file(start_sim: SimStarter, tmp_path: Path) -> None:
    token_file = tmp_path / "sim.token"
    token_file.write_text("from-the-file\n")
    # The launcher also sets $KINTSUGI_SIM_TOKEN (to its own random token): the file must win.
    async with start_sim("--time-scale", "0", "--token-file", str(token_file)) as sim:
        async with HttpDualBeam(sim.url, token="from-the-file") as scope:
            assert (await scope.identity()).model
        async with HttpDualBeam(sim.url, token=sim.token) as scope:
            with pytest.raises(Unauthorized):
                await scope.identity()


def test_simulator_unit_takes_its_token_from_a_credential_file() -> None:
    """The systemd unit loads the token as a credential (the unit fails to start without the file) and
    passes only the file's path."""
    unit = UNIT.read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "LoadCredential=token:/etc/kintsugi/sim.token" in unit
    assert exec_start.endswith("--token-file ${CREDENTIALS_DIRECTORY}/token")
    assert "--token " not in exec_start and "TOKEN=" not in unit


def test_operator_password_is_asked_on_a_terminal(tmp_path: Path) -> None:
    """`kintsugi status --username operator` on a terminal, with no password file or variable: it asks,
    reads the password without echo, and uses it (the broker accepts it: the retained status comes back)."""
    import json
    import os
    import pty
    import select
    import time

    import paho.mqtt.publish as publish

    from tests.support.mqtt_broker import Broker, mosquitto_available, secret

    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    instrument = "hydra-tty"
    with Broker(tmp_path / "broker", [instrument]) as broker:
        status = {"state": "online", "path": "idle", "session": "s", "since": 1.0, "ts": time.time()}
        publish.single(
            f"kintsugi/v1/{instrument}/status",
            json.dumps(status),
            qos=1,
            retain=True,
            hostname=broker.host,
            port=broker.port,
            auth={"username": instrument, "password": secret(instrument)},
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_MQTT__")} | {
            "KINTSUGI_INSTRUMENT_ID": instrument,
            "KINTSUGI_MQTT__PORT": str(broker.port),
        }
        pid, fd = pty.fork()
        if pid == 0:  # the child: the CLI on a terminal
            os.execve(
                sys.executable,
                [sys.executable, "-m", "kintsugi_daemon.cli", "status", "--json", "--username", "operator"],
                env,
            )
        out = b""
        answered = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break  # the child closed the terminal: it has exited
            if not chunk:
                break
            out += chunk
            if not answered and b"MQTT password for operator:" in out:
                os.write(fd, secret("operator").encode() + b"\n")
                answered = True
        _, code = os.waitpid(pid, 0)
    assert answered, out
    assert secret("operator").encode() not in out  # not echoed
    assert os.waitstatus_to_exitcode(code) == 0, out
    assert b'"path": "idle"' in out
