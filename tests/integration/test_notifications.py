"""Notifications through real Apprise to a real HTTP receiver on loopback (Apprise's json://), and a
notifier that is down (a black hole that accepts and never answers) costing the daemon nothing."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kintsugi_daemon.config import ConfigError, NotifySettings
from kintsugi_daemon.demo.simulator_process import SimulatorProcess
from kintsugi_daemon.service.notify import FIDUCIAL_LOST_ALERT, Notifier, Observation
from tests.support.http_receiver import black_hole, receiver
from tests.support.mqtt_broker import Broker, mosquitto_available
from tests.support.onnx_models import build_threshold_model
from tests.support.stack import Stack, process


def obs(state: str, alerts: dict[str, Any] | None = None, overlay: Path | None = None) -> Observation:
    return Observation(state=state, run_id="run-1", alerts=alerts or {}, slice=3, total=4, overlay=overlay)


@pytest.fixture
def overlay(tmp_path: Path) -> Path:
    path = tmp_path / "0003_overlay.png"
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0] = 235
    Image.fromarray(rgb).save(path)
    return path


def start(notifier: Notifier) -> asyncio.Task[None]:
    return asyncio.create_task(notifier.run(), name="notify")


async def test_run_finished_is_sent_once_with_the_overlay_attached(overlay: Path) -> None:
    with receiver() as rx:
        notifier = Notifier(NotifySettings(urls=[rx.url]), "hydra-01")
        task = start(notifier)
        notifier.observe(obs("running.checkpoint"))
        notifier.observe(obs("done", overlay=overlay))
        notifier.observe(obs("done", overlay=overlay))  # still done: nothing new
        [body] = await rx.wait_for(1)
        assert await notifier.flush(5)
        assert body["title"] == "kintsugi hydra-01: run finished"
        assert body["type"] == "success"
        assert "run run-1, slice 3 of 4" in body["message"]
        [attachment] = body["attachments"]
        assert attachment["mimetype"] == "image/png"
        assert base64.b64decode(attachment["base64"]) == overlay.read_bytes()
        assert len(rx.bodies) == 1 and notifier.pending == 0
        task.cancel()


async def test_faulted_names_the_fault_and_a_daemon_start_in_a_state_is_no_transition() -> None:
    with receiver() as rx:
        notifier = Notifier(NotifySettings(urls=[rx.url], attach_overlay=False), "hydra-01")
        task = start(notifier)
        fault = {"fault": {"id": "fault", "message": "mill: CommsLost: instrument unreachable"}}
        notifier.observe(obs("faulted", fault))  # first sight (a restart): not a transition
        assert notifier.pending == 0
        notifier.observe(obs("running.mill"))
        notifier.observe(obs("faulted", fault))
        [body] = await rx.wait_for(1)
        assert body["type"] == "failure"
        assert "FAULTED" in body["title"]
        assert "mill: CommsLost: instrument unreachable" in body["message"]
        assert body["attachments"] == []
        task.cancel()


async def test_suspended_longer_than_the_limit_is_sent_and_a_short_suspension_is_not() -> None:
    with receiver() as rx:
        settings = NotifySettings(urls=[rx.url], suspended_after_s=0.3)
        notifier = Notifier(settings, "hydra-01")
        task = start(notifier)
        vacuum = {"guard_vacuum": {"id": "guard_vacuum", "message": "chamber vacuum 2e-3 Pa"}}
        notifier.observe(obs("running.mill"))
        notifier.observe(obs("suspended", vacuum))
        assert notifier.watching_suspension
        notifier.observe(obs("resuming"))  # back before the limit: nothing to say
        assert not notifier.watching_suspension
        t0 = time.monotonic()
        notifier.observe(obs("suspended", vacuum))
        [body] = await rx.wait_for(1, timeout_s=10)
        assert time.monotonic() - t0 >= 0.3
        assert body["type"] == "warning" and "suspended" in body["title"]
        assert "chamber vacuum 2e-3 Pa" in body["message"]
        task.cancel()


async def test_fiducial_lost_alert_is_sent_once_per_raise() -> None:
    with receiver() as rx:
        notifier = Notifier(NotifySettings(urls=[rx.url]), "hydra-01")
        task = start(notifier)
        lost = {FIDUCIAL_LOST_ALERT: {"id": FIDUCIAL_LOST_ALERT, "message": "fiducial not found at slice 3"}}
        notifier.observe(obs("running.image"))
        notifier.observe(obs("running.image", lost))
        notifier.observe(obs("running.adapt", lost))  # still active: not again
        [body] = await rx.wait_for(1)
        assert await notifier.flush(5)
        assert "fiducial lost" in body["title"] and "fiducial not found at slice 3" in body["message"]
        assert len(rx.bodies) == 1
        notifier.observe(obs("running.adapt"))
        notifier.observe(obs("running.image", lost))  # raised again
        await rx.wait_for(2)
        task.cancel()


async def test_a_notifier_that_never_answers_costs_the_loop_nothing_and_the_queue_stays_bounded() -> None:
    with black_hole() as dead:
        settings = NotifySettings(urls=[dead], timeout_s=1.0, queue=4)
        notifier = Notifier(settings, "hydra-01")
        task = start(notifier)
        lag = 0.0
        t0 = time.perf_counter()
        for _ in range(50):
            notifier.observe(obs("running.mill"))
            notifier.observe(obs("done"))
        observe_s = time.perf_counter() - t0
        assert observe_s < 0.05, observe_s  # deciding is synchronous and cheap; nothing is sent inline
        assert notifier.pending <= 4 and notifier.dropped >= 45
        # While deliveries hang on the dead service, the event loop keeps its pace.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - before - 0.01)
        assert lag < 0.1, lag
        assert not await notifier.flush(0.1)  # still trying, bounded by timeout_s per notification
        assert await notifier.flush(10)
        assert notifier.failed >= 1 and notifier.delivered == []
        task.cancel()


def test_a_url_apprise_does_not_know_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"notify\.urls\[1\]: .*'nosuchscheme'"):
        Notifier(NotifySettings(urls=["json://127.0.0.1:9/ok", "nosuchscheme://x"]), "hydra-01")


# --- the daemon ---------------------------------------------------------------------------------------

RECIPE = """
[run]
name = "notify"
slices = 2
slice_thickness_m = 40e-9

[roi]
width_m = 10e-6
height_m = 8e-6

[imaging]
detectors = ["cbs", "tld"]
width_px = 192
height_px = 128

[segmentation]
enabled = true
model = "{model}"

[guards]
min_free_disk_bytes = 0
"""


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
async def test_daemon_sends_run_finished_with_the_last_overlay_while_another_notifier_is_dead(
    sim: SimulatorProcess, tmp_path: Path
) -> None:
    model = build_threshold_model(
        tmp_path / "threshold.onnx",
        {"pore": 0.95, "unfilled_pore": 0.05, "active": 0.53, "cbd": 0.23, "collector": 0.4},
    )
    broker = Broker(tmp_path / "broker", ["notify-01"])
    broker.start()
    try:
        with receiver() as rx, black_hole() as dead:
            stack = Stack(broker, sim, tmp_path, instrument_id="notify-01")
            settings = stack.settings_file(
                extra=f'\n[notify]\nurls = ["{dead}", "{rx.url}"]\ntimeout_s = 10\n'
            )
            args = ["serve", "--config", str(settings)]
            async with process(args, tmp_path / "daemon.log", ready=r'"event": "ready"'):
                await stack.wait_path("idle")
                t0 = time.monotonic()
                reply = await stack.operator().command("start", {"recipe": RECIPE.format(model=model)})
                assert reply["accepted"], reply
                await stack.wait_path("done")
                run_s = time.monotonic() - t0
                [body] = await rx.wait_for(1, timeout_s=20)
            assert body["title"] == "kintsugi notify-01: run finished"
            [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
            assert f"run {run_dir.name}, slice 2 of 2" in body["message"]
            last = run_dir / "previews" / "0001_overlay.png"
            [attachment] = body["attachments"]
            assert base64.b64decode(attachment["base64"]) == last.read_bytes()
            assert run_s < 30, run_s  # the dead notifier is not in the run's path
    finally:
        broker.stop()
