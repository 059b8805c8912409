"""A broker shared by several instruments, against a real Mosquitto: per-instrument identities in the ACL
(a daemon writes only its own topic tree, an operator commands only the instruments granted to them) and
TLS with certificates made here by openssl (a client holding the wrong CA is refused).

Mosquitto drops a publish or a delivery the ACL forbids without telling the client (MQTT 3.1.1), so
each check sends the forbidden message and then an allowed sentinel from the same client: the broker
handles one client's packets in order, so once the sentinel has arrived the forbidden one would have.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from kintsugi_daemon.cli.remote import Operator, OperatorError
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.broker_acl import ALL, Access, acl_text
from kintsugi_daemon.demo.broker_acl import main as acl_main
from kintsugi_daemon.service.journal import Journal
from kintsugi_daemon.service.mqtt_link import MqttLink
from tests.integration.test_mqtt import Daemon
from tests.support.mqtt_broker import Broker, mosquitto_available, secret

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto binary not installed")

WAIT_S = 15.0
A, B = "hydra-a", "hydra-b"
SITE = Access(
    instruments=(A, B),
    operators={"alice": (A,), "oncall": (ALL,)},
    monitors={"grafana": (ALL,), "phone-b": (B,)},
)
DEPLOY_ACL = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "kintsugi.acl"
# The example the shipped ACL was generated from (its header says so).
DEPLOY_EXAMPLE = ["--operator", "alice=hydra-01", "--operator", "oncall=+", "--monitor", "grafana=+"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker", access=SITE)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def connect(broker: Broker, user: str, **kwargs: Any) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=secret(user),
        identifier=f"{user}-{uuid.uuid4().hex[:6]}",
        **kwargs,
    )


async def received_until_sentinel(listener: aiomqtt.Client, sentinel: str) -> list[tuple[str, bytes]]:
    """Every message up to and including the one on `sentinel` (bounded by WAIT_S)."""
    seen: list[tuple[str, bytes]] = []
    async with asyncio.timeout(WAIT_S):
        async for message in listener.messages:
            assert isinstance(message.payload, bytes)
            seen.append((str(message.topic), message.payload))
            if str(message.topic) == sentinel:
                return seen
    raise AssertionError("message stream ended")


def topic(instrument: str, suffix: str) -> str:
    return f"kintsugi/v1/{instrument}/{suffix}"


async def test_a_daemon_writes_only_its_own_instrument(site: Broker) -> None:
    """Instrument A's daemon cannot publish B's retained status (nor commands, nor B's events).
    Mutation seen red: the daemon patterns spelled `kintsugi/v1/+/...` (one shared identity, as before)."""
    async with connect(site, "grafana") as monitor, connect(site, A) as daemon_a:
        await monitor.subscribe("kintsugi/v1/#", qos=1)
        for forged in ("status", "events/run_finished", "cmd/abort", "alerts/vacuum"):
            await daemon_a.publish(topic(B, forged), b'{"state": "forged"}', qos=1, retain=forged == "status")
        await daemon_a.publish(topic(A, "status"), b'{"state": "online"}', qos=1, retain=True)
        seen = await received_until_sentinel(monitor, topic(A, "status"))
    assert seen == [(topic(A, "status"), b'{"state": "online"}')]
    async with connect(site, "grafana") as late:  # and nothing forged was retained under B
        await late.subscribe(topic(B, "#"), qos=1)
        await late.subscribe(topic(A, "status"), qos=1)
        assert [t for t, _ in await received_until_sentinel(late, topic(A, "status"))] == [topic(A, "status")]


async def test_a_daemon_reads_only_its_own_commands(site: Broker) -> None:
    async with connect(site, A) as daemon_a, connect(site, "oncall") as oncall:
        await daemon_a.subscribe("kintsugi/v1/+/cmd/+", qos=1)  # it asks for everyone's
        await oncall.publish(topic(B, "cmd/start"), b"{}", qos=1)
        await oncall.publish(topic(A, "cmd/pause"), b"{}", qos=1)
        seen = await received_until_sentinel(daemon_a, topic(A, "cmd/pause"))
    assert [t for t, _ in seen] == [topic(A, "cmd/pause")]


async def test_an_operator_commands_and_reads_only_granted_instruments(site: Broker) -> None:
    """alice holds A only: her command to B never reaches B's daemon, and she never sees B's topics.
    Mutation seen red: operators granted `+` whatever their grant."""
    async with (
        connect(site, B) as daemon_b,
        connect(site, "alice") as alice,
        connect(site, "oncall") as oncall,
    ):
        await daemon_b.subscribe(topic(B, "cmd/+"), qos=1)
        await alice.subscribe("kintsugi/v1/#", qos=1)
        await alice.publish(topic(B, "cmd/abort"), b"{}", qos=1)  # not granted
        await oncall.publish(topic(B, "cmd/pause"), b"{}", qos=1)
        assert [t for t, _ in await received_until_sentinel(daemon_b, topic(B, "cmd/pause"))] == [
            topic(B, "cmd/pause")  # oncall's arrived; alice's abort did not
        ]
        await daemon_b.publish(topic(B, "status"), b'{"state": "online"}', qos=1)
        await oncall.publish(topic(A, "cmd/resume"), b"{}", qos=1)  # alice may read A's commands
        # Different publishers: wait for A's sentinel, then B's status (sent earlier) must not be there.
        seen = await received_until_sentinel(alice, topic(A, "cmd/resume"))
        assert all(t.startswith(f"kintsugi/v1/{A}/") for t, _ in seen)
        await alice.publish(topic(A, "cmd/resume/reply"), b"{}", qos=1)  # replies come from the daemon only
        await alice.publish(topic(A, "cmd/stop"), b"{}", qos=1)
        seen = await received_until_sentinel(alice, topic(A, "cmd/stop"))
        assert [t for t, _ in seen] == [topic(A, "cmd/stop")]


async def test_a_monitor_only_reads(site: Broker) -> None:
    async with connect(site, "grafana") as grafana, connect(site, "oncall") as oncall:
        await grafana.subscribe("kintsugi/v1/#", qos=1)
        await grafana.publish(topic(A, "cmd/abort"), b"{}", qos=1)
        await oncall.publish(topic(A, "cmd/pause"), b"{}", qos=1)
        # grafana's abort would come first (its PUBACK returned before oncall published).
        assert [t for t, _ in await received_until_sentinel(grafana, topic(A, "cmd/pause"))] == [
            topic(A, "cmd/pause")
        ]


def test_access_refuses_ambiguous_identities() -> None:
    with pytest.raises(ValueError, match="both an instrument and a person"):
        Access(instruments=("alice",), operators={"alice": ("alice",)})
    with pytest.raises(ValueError, match="'a/b'"):
        Access(instruments=("a/b",))
    with pytest.raises(ValueError, match="no instrument granted"):
        Access(operators={"bob": ()})
    with pytest.raises(ValueError, match="'#'"):
        Access(operators={"bob": ("#",)})


def test_shipped_acl_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/mosquitto/kintsugi.acl is the generator's output for the example grants in its header."""
    assert acl_main(DEPLOY_EXAMPLE) == 0
    generated = capsys.readouterr().out
    shipped = DEPLOY_ACL.read_text()
    assert shipped.endswith(generated)
    assert "pattern write kintsugi/v1/%u/status" in shipped and "kintsugi/v1/+/status" not in shipped
    assert "user alice\ntopic write kintsugi/v1/hydra-01/cmd/+\ntopic read kintsugi/v1/hydra-01/#" in shipped
    assert generated == acl_text(
        Access(operators={"alice": ("hydra-01",), "oncall": (ALL,)}, monitors={"grafana": (ALL,)})
    )


# --- TLS ----------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}"),
        cwd=directory,
    )
    return crt, key


def make_server_cert(directory: Path, ca: tuple[Path, Path], host: str) -> tuple[Path, Path]:
    """A broker certificate for `host` (as an IP SAN) signed by `ca`: (certificate, key)."""
    crt, key, csr, ext = (directory / f"broker.{s}" for s in ("crt", "key", "csr", "ext"))
    _openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}"),
        cwd=directory,
    )
    ext.write_text(f"subjectAltName = IP:{host}\nbasicConstraints = CA:FALSE\n")
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial"),
        *("-out", str(crt), "-days", "2", "-extfile", str(ext)),
        cwd=directory,
    )
    return crt, key


@pytest.fixture
def tls_site(tmp_path: Path) -> Iterator[tuple[Broker, Path, Path]]:
    """A TLS-only broker for instrument A: (broker, the right CA, a wrong CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    pki = tmp_path / "pki"
    ca = make_ca(pki, "kintsugi-test-ca")
    wrong_ca, _ = make_ca(pki / "other", "impostor-ca")
    broker = Broker(tmp_path / "broker", [A], tls=make_server_cert(pki, ca, "127.0.0.1"))
    broker.start()
    try:
        yield broker, ca[0], wrong_ca
    finally:
        broker.kill()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite", session="sess-tls") as j:
        yield j


async def test_daemon_and_operator_over_tls(tls_site: tuple[Broker, Path, Path], journal: Journal) -> None:
    """The daemon's link and the operator's client, both with `tls = true` and the facility CA, talk
    through a TLS-only Mosquitto; the operator reads the status the daemon published."""
    broker, ca, _ = tls_site
    daemon = Daemon(path="idle")
    link = MqttLink(
        MqttSettings(
            host=broker.host, port=broker.port, username=A, password=secret(A), tls=True, ca_file=ca
        ),
        A,
        journal,
        status_provider=daemon.status,
        description_provider=daemon.description,
        command_handler=daemon.handle,
    )
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await link.wait_connected()
        operator = Operator(
            MqttSettings(
                host=broker.host,
                port=broker.port,
                username="operator",
                password=secret("operator"),
                tls=True,
                ca_file=ca,
            ),
            A,
        )
        view = await operator.snapshot(WAIT_S)
        assert view.status is not None and view.status["state"] == "online"
        reply = await operator.command("pause", {"now": False})
        assert reply["accepted"] and daemon.calls and daemon.calls[0][0] == "pause"
    finally:
        link.close()
        async with asyncio.timeout(WAIT_S):
            await task


async def test_tls_refuses_a_client_with_the_wrong_ca(tls_site: tuple[Broker, Path, Path]) -> None:
    broker, ca, wrong_ca = tls_site
    wrong = Operator(
        MqttSettings(
            host=broker.host,
            port=broker.port,
            username="operator",
            password=secret("operator"),
            tls=True,
            ca_file=wrong_ca,
        ),
        A,
    )
    with pytest.raises(OperatorError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await wrong.snapshot(WAIT_S)
    plain = Operator(
        MqttSettings(host=broker.host, port=broker.port, username="operator", password=secret("operator")), A
    )
    with pytest.raises(OperatorError):  # no TLS at all: the listener speaks nothing else
        await plain.snapshot(WAIT_S)
    # The right CA, for contrast: the same client connects (nothing else about it was wrong).
    context = ssl.create_default_context(cafile=str(ca))
    async with aiomqtt.Client(
        broker.host, broker.port, username="monitor", password=secret("monitor"), tls_context=context
    ) as ok:
        await ok.subscribe(f"kintsugi/v1/{A}/status", qos=1)
