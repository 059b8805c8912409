"""The operator's command line against a real Mosquitto (own passwords and ACL), as a person types it.

Each case here was a rough edge on a fresh clone (issue 12, part 4): tracebacks instead of advice, the
daemon's credentials used for the operator, `watch` dying on a stray non-JSON message.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.service.messages import Topics
from tests.support.mqtt_broker import Broker, free_port, mosquitto_available, secret

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto binary not installed")

WAIT_S = 15.0


@pytest.fixture
def broker(tmp_path: Path, instrument: str) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", [instrument])
    b.start()
    try:
        yield b
    finally:
        b.kill()


@pytest.fixture
def instrument() -> str:
    return f"op-{uuid.uuid4().hex[:8]}"


def daemon_config(tmp_path: Path, instrument: str, port: int) -> Path:
    """The daemon's settings file as an admin would hand it out: [mqtt] holds the *daemon's* login."""
    path = tmp_path / "daemon.toml"
    path.write_text(
        f'instrument_id = "{instrument}"\ndata_root = "{tmp_path / "runs"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
        f'username = "{instrument}"\npassword = "{secret(instrument)}"\n'
    )
    return path


def kintsugi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_")}
    return subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        check=False,
    )


async def publish_as_daemon(broker: Broker, topic: str, payload: bytes, retain: bool = True) -> None:
    instrument = topic.split("/")[2]  # a daemon's identity is its instrument id
    async with aiomqtt.Client(
        broker.host, broker.port, username=instrument, password=secret(instrument)
    ) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


def status_payload(path: str) -> bytes:
    return json.dumps({"state": "online", "path": path, "session": "s-1", "since": 1.0, "ts": 2.0}).encode()


async def test_operator_commands_log_in_as_the_operator_not_the_daemon(
    broker: Broker, instrument: str, tmp_path: Path
) -> None:
    """The ACL lets the daemon user neither read status nor send commands: a CLI that logs in with the
    config's [mqtt] user (the daemon's) times out. The operator's own login comes from the environment."""
    topics = Topics(instrument)
    await publish_as_daemon(broker, topics.status, status_payload("faulted"))
    alert = {"id": "instrument_fault", "severity": "critical", "message": "stage stuck", "since": 1.0}
    await publish_as_daemon(broker, topics.alert("instrument_fault"), json.dumps(alert).encode())
    config = daemon_config(tmp_path, instrument, broker.port)
    env = {"KINTSUGI_OPERATOR__USERNAME": "operator", "KINTSUGI_OPERATOR__PASSWORD": secret("operator")}
    done = await asyncio.to_thread(kintsugi, "status", "--json", "--config", str(config), env=env)
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"]["path"] == "faulted"
    assert list(view["alerts"]) == ["instrument_fault"]  # the active alert is part of the snapshot


async def test_wrong_password_says_what_to_check(broker: Broker, instrument: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, instrument, broker.port)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("wrong\n")
    done = await asyncio.to_thread(
        kintsugi, "status", "--config", str(config), "--username", "operator", "--password-file", str(wrong)
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"the broker at 127.0.0.1:{broker.port} as user 'operator' refused the login" in done.stderr
    assert "KINTSUGI_OPERATOR__PASSWORD" in done.stderr


async def test_unreachable_broker_says_which_address(instrument: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = daemon_config(tmp_path, instrument, port)
    done = await asyncio.to_thread(kintsugi, "pause", "--config", str(config), "--username", "operator")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cannot reach the broker at 127.0.0.1:{port}" in done.stderr
    assert "KINTSUGI_MQTT__HOST" in done.stderr


async def test_no_daemon_reply_says_what_to_check(broker: Broker, instrument: str, tmp_path: Path) -> None:
    config = daemon_config(tmp_path, instrument, broker.port)
    env = {"KINTSUGI_OPERATOR__USERNAME": "operator", "KINTSUGI_OPERATOR__PASSWORD": secret("operator")}
    done = await asyncio.to_thread(kintsugi, "pause", "--config", str(config), "--timeout", "1", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"no reply to pause within 1 s from instrument {instrument!r}" in done.stderr
    assert "kintsugi status" in done.stderr and "ACL" in done.stderr


async def test_watch_survives_non_json_messages(broker: Broker, instrument: str) -> None:
    """Anyone allowed to publish may send garbage on a command topic (or a buggy tool on a daemon topic):
    the live view notes it and keeps watching."""
    topics = Topics(instrument)
    op = Operator(
        MqttSettings(host=broker.host, port=broker.port, username="operator", password=secret("operator")),
        instrument,
    )
    subscribed = asyncio.Event()

    def until_running(view: DaemonView) -> bool:
        subscribed.set()  # the first message is the retained status below
        return (view.status or {}).get("path") == "running.mill"

    await publish_as_daemon(broker, topics.status, status_payload("idle"))
    watch = asyncio.create_task(op.watch(until_running, timeout_s=WAIT_S))
    async with asyncio.timeout(WAIT_S):
        await subscribed.wait()
    async with aiomqtt.Client(
        broker.host, broker.port, username="operator", password=secret("operator")
    ) as c:
        await c.publish(topics.command("pause"), b"pause please", qos=1)
    await publish_as_daemon(broker, topics.progress, b"\xff not json", retain=False)
    await publish_as_daemon(broker, topics.status, status_payload("running.mill"))
    view = await watch
    assert (view.status or {}).get("path") == "running.mill"
    assert view.ignored == 1 and view.last_ignored == "progress"  # the command is not the daemon's state
    assert "ignored  1 message(s)" in view.render()
