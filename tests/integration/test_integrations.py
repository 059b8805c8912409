"""Integrations that need no code (deploy/integrations/, Home Assistant discovery): Node-RED for real
(from npm), Home Assistant's discovery configs from a real daemon with their templates rendered by
Jinja2 against the daemon's real payloads, and the Telegraf config and Grafana dashboard checked against
the metrics the daemon publishes (neither tool installs from the registries this project reaches)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import jinja2
import numpy as np
import pytest

from kintsugi_daemon.demo.broker import free_port
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.inference.metrics import slice_metrics
from kintsugi_daemon.service.home_assistant import SENSORS
from kintsugi_daemon.service.messages import Alert, Envelope, Progress, Status, Topics
from tests.support.mqtt_broker import Broker, mosquitto_available, secret
from tests.support.stack import Stack, process

ROOT = Path(__file__).resolve().parents[2]
INTEGRATIONS = ROOT / "deploy" / "integrations"

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


def daemon_metrics() -> dict[str, float]:
    """The metrics topic's keys and kinds, from the function the daemon itself uses."""
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 20:40] = 2
    labels[:10, :] = 3
    labels[50:, :] = 1
    confidence = np.full(labels.shape, 0.9, np.float32)  # the daemon passes the model's confidence maps
    numeric = slice_metrics(labels, 40e-9, max_probability=confidence, entropy=1 - confidence).numeric()
    return {"slice": 3.0, **numeric}


# --- Telegraf and Grafana -------------------------------------------------------------------------


def test_telegraf_consumes_every_instruments_metrics_topic_as_the_dashboard_expects() -> None:
    config = tomllib.loads((INTEGRATIONS / "telegraf.conf").read_text())
    [consumer] = config["inputs"]["mqtt_consumer"]
    [topic] = consumer["topics"]
    for instrument in ("hydra-01", "hydra-02"):
        assert aiomqtt.Topic(Topics(instrument).metrics).matches(topic)
    assert consumer["username"] == "monitor" and consumer["qos"] == 0
    [parsing] = consumer["topic_parsing"]
    assert parsing["tags"].split("/")[2] == "instrument"  # kintsugi/v1/<instrument>/metrics
    dashboard = json.loads((INTEGRATIONS / "grafana-dashboard.json").read_text())
    metrics = daemon_metrics()
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            query = target["query"]
            assert f'r._measurement == "{consumer["name_override"]}"' in query
            fields = {part.split('"')[1] for part in query.split("r._field == ")[1:]}
            assert fields, panel["title"]
            queried |= fields
    assert queried <= set(metrics), queried - set(metrics)
    assert {"porosity", "fraction_pore", "fraction_unfilled_pore", "cracks_empty"} <= queried
    assert dashboard["templating"]["list"][0]["name"] == "instrument"


# --- Home Assistant -------------------------------------------------------------------------------


def render(template: str, payload: bytes) -> str:
    """As Home Assistant renders a value template: `value` is the payload text, `value_json` its JSON."""
    text = payload.decode()
    try:
        value_json: Any = json.loads(text)
    except json.JSONDecodeError:
        value_json = None
    return jinja2.Environment().from_string(template).render(value=text, value_json=value_json).strip()


@needs_mosquitto
async def test_home_assistant_discovery_describes_the_daemons_real_topics(
    sim: SimulatorProcess, tmp_path: Path
) -> None:
    broker = Broker(tmp_path / "broker", ["ha-01"])
    broker.start()
    try:
        stack = Stack(broker, sim, tmp_path, instrument_id="ha-01")
        settings = stack.settings_file(extra="\n[home_assistant]\ndiscovery = true\n")
        async with process(
            ["serve", "--config", str(settings)], tmp_path / "d.log", ready='"event": "ready"'
        ):
            await stack.wait_path("idle")
            configs: dict[str, dict[str, Any]] = {}
            retained: dict[str, bytes] = {}
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="monitor", password=secret("monitor")
            ) as client:
                await client.subscribe("homeassistant/+/+/+/config", qos=1)
                await client.subscribe("kintsugi/v1/ha-01/status", qos=1)
                async with asyncio.timeout(10):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        if message.topic.matches("homeassistant/#"):
                            configs[str(message.topic)] = json.loads(message.payload)
                        else:
                            retained[str(message.topic)] = message.payload
                        if len(configs) == len(SENSORS) and retained:
                            break
    finally:
        broker.stop()
    by_key = {c["unique_id"].removeprefix("kintsugi_ha-01_"): c for c in configs.values()}
    assert set(by_key) == set(SENSORS)
    for topic, config in configs.items():
        component, node, _key = topic.split("/")[1:4]
        assert node == "kintsugi_ha-01" and component in ("sensor", "binary_sensor")
        assert config["device"]["identifiers"] == ["kintsugi_ha-01"]
        assert config["state_topic"].startswith("kintsugi/v1/ha-01/")
    status = retained["kintsugi/v1/ha-01/status"]
    assert render(by_key["state"]["availability_template"], status) == "online"
    assert render(by_key["state"]["value_template"], status) == "idle"
    # The broker's Last Will says `lost`; Home Assistant knows only online/offline.
    will = Status(state="lost", session="s1", reason="connection lost").model_dump_json().encode()
    assert render(by_key["state"]["availability_template"], will) == "offline"
    progress = Progress(run_id="r1", slice=3, total=10, step="mill", percent=30.0, eta_s=1234.4)
    wire = progress.model_dump_json().encode()
    assert render(by_key["slice"]["value_template"], wire) == "3"
    assert render(by_key["slices_total"]["value_template"], wire) == "10"
    assert float(render(by_key["eta"]["value_template"], wire)) == 1234.0
    metrics = json.dumps(daemon_metrics()).encode()
    assert float(render(by_key["porosity"]["value_template"], metrics)) == daemon_metrics()["porosity"]
    fault = Alert(id="fault", severity="critical", message="stage", since=1.0).model_dump_json().encode()
    assert render(by_key["fault"]["value_template"], fault) == "ON"
    assert render(by_key["fault"]["value_template"], b"") == "OFF"  # the cleared retained alert


# --- Node-RED -------------------------------------------------------------------------------------


def node_red() -> str | None:
    """`node-red` from KINTSUGI_NODE_RED, the repository's npm cache (.ci/run installs it) or PATH."""
    candidates = [
        os.environ.get("KINTSUGI_NODE_RED"),
        str(ROOT / ".cache/node-red/node_modules/.bin/node-red"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("node-red")


@needs_mosquitto
@pytest.mark.skipif(node_red() is None, reason="node-red is not installed (npm install node-red)")
async def test_node_red_flow_follows_status_alerts_and_runs_in_real_node_red(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", ["red-01"])
    broker.start()
    user_dir = tmp_path / "node-red"
    user_dir.mkdir()
    flow = json.loads((INTEGRATIONS / "node-red-flow.json").read_text())
    [broker_node] = [n for n in flow if n["type"] == "mqtt-broker"]
    (user_dir / "flows.json").write_text(json.dumps(flow))
    (user_dir / "flows_cred.json").write_text(
        json.dumps({broker_node["id"]: {"user": "monitor", "password": secret("monitor")}})
    )
    port = free_port()
    (user_dir / "settings.js").write_text(
        f'module.exports = {{ uiPort: {port}, uiHost: "127.0.0.1", flowFile: "flows.json", '
        'credentialSecret: false, logging: { console: { level: "info" } } };\n'
    )
    env = {**os.environ, "KINTSUGI_MQTT_HOST": "127.0.0.1", "KINTSUGI_MQTT_PORT": str(broker.port)}
    log = (tmp_path / "node-red.log").open("wb")
    red = await asyncio.create_subprocess_exec(
        str(node_red()),
        "--settings",
        str(user_dir / "settings.js"),
        "--userDir",
        str(user_dir),
        stdout=log,
        stderr=log,
        env=env,
    )
    topics = Topics("red-01")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await until(lambda: answers(http), 60)  # Node-RED is up and the flow's endpoint answers
            await until(lambda: connected(tmp_path / "node-red.log"), 20)
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="red-01", password=secret("red-01")
            ) as daemon:
                status = Status(state="online", path="running.mill", session="s1", since=1.0, ts=2.0)
                await daemon.publish(topics.status, status.model_dump_json(), qos=1, retain=True)
                progress = Progress(run_id="r1", slice=5, total=24, step="mill", percent=20.8, eta_s=600.0)
                await daemon.publish(topics.progress, progress.model_dump_json(), qos=1, retain=True)
                alert = Alert(id="fault", severity="critical", message="stage stuck", since=3.0, run_id="r1")
                await daemon.publish(topics.alert("fault"), alert.model_dump_json(), qos=1, retain=True)
                faulted = status.model_copy(update={"path": "faulted", "reason": "stage stuck"})
                await daemon.publish(topics.status, faulted.model_dump_json(), qos=1, retain=True)
                state = await until(
                    lambda: seen(
                        http,
                        lambda s: s.get("status", {}).get("path") == "faulted" and "fault" in s["alerts"],
                    ),
                    10,
                )
                assert (
                    state["progress"]["slice"] == 5 and state["alerts"]["fault"]["message"] == "stage stuck"
                )
                await daemon.publish(topics.alert("fault"), b"", qos=1, retain=True)  # cleared
                finished = Envelope(
                    id="s1-9",
                    source="/kintsugi/v1/red-01",
                    type="kintsugi.run_finished",
                    time="2026-11-30T00:00:00Z",
                    run_id="r1",
                    session="s1",
                    seq=9,
                    data={"how": "done", "slices": 24},
                )
                await daemon.publish(topics.event("run_finished"), finished.model_dump_json(), qos=1)
                state = await until(lambda: seen(http, lambda s: not s["alerts"] and s.get("finished")), 10)
                assert state["finished"] == {"how": "done", "slices": 24}
        text = (tmp_path / "node-red.log").read_text(errors="replace")
        assert "red-01: FAULTED (stage stuck)" in text
        assert "red-01: alert fault: stage stuck" in text
        assert "red-01: run r1 finished (done)" in text
    finally:
        red.terminate()
        await red.wait()
        log.close()
        broker.stop()


async def get(http: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        response = await http.get("/kintsugi")
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


async def answers(http: httpx.AsyncClient) -> bool:
    return await get(http) is not None


async def connected(log: Path) -> bool:
    return "Connected to broker" in log.read_text(errors="replace")


async def seen(http: httpx.AsyncClient, check: Any) -> dict[str, Any] | None:
    state = await get(http)
    mine = (state or {}).get("red-01")
    return mine if mine and check(mine) else None


async def until(probe: Any, timeout_s: float) -> Any:
    """Poll another process (Node-RED) until `probe()` gives something truthy."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = await probe()
            if result:
                return result
            await asyncio.sleep(0.2)
