"""Drills at the daemon's doors: a flood of fuzzed and unauthorised MQTT commands, a second daemon on the
same journal, and `start` naming recipes. Every part real (Mosquitto with its ACL, the simulator process,
`kintsugi serve` as its own process)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from benchmarks.drills.fuzz import fuzz_drill
from benchmarks.drills.rig import drill_recipe, rig
from tests.support.mqtt_broker import mosquitto_available

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

# CI count; `python -m benchmarks.drills` sends the 10,000.
FUZZ_COMMANDS = int(os.environ.get("KINTSUGI_DRILL_FUZZ", "2000"))


async def test_fuzzed_and_unauthorised_commands_change_nothing(tmp_path: Path) -> None:
    """Mutation seen red: `MqttLink._check_fresh` made a no-op (stale and future commands reach the state
    machine: a stale `resume` or `abort` is accepted and the paused run moves)."""
    report = await fuzz_drill(tmp_path, commands=FUZZ_COMMANDS, seed=1)
    assert report.sent == FUZZ_COMMANDS and report.unauthorised == FUZZ_COMMANDS // 10
    assert report.unanswered == 0 and report.replies == FUZZ_COMMANDS  # every one answered ...
    assert report.accepted == 0  # ... and refused
    assert report.reached_daemon_unauthorised == 0  # the ACL dropped every unauthorised one
    assert report.state_after["path"] == "paused" == report.state_before["path"]
    assert report.state_after["session"] == report.state_before["session"]  # the daemon never restarted
    assert report.files_unchanged and report.face_unchanged
    assert report.finished_after
    assert len(report.kinds) >= 12  # every kind of defect was sent


async def test_a_second_daemon_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    """Mutation seen red: the InstanceLock taken in Service.__init__ removed (the second daemon starts,
    takes the broker's client id from the first and both drive the instrument)."""
    async with rig(tmp_path, time_scale=0.15) as r:
        first = await r.start_daemon("daemon-1.log")
        try:
            online = await r.wait_for("idle")
            assert (await r.operator().command("start", {"recipe": drill_recipe(2)}))["accepted"]
            second = await r.start_daemon("daemon-2.log")
            assert await asyncio.wait_for(second.wait(), 60) == 1
            said = (tmp_path / "daemon-2.log").read_text()
            assert "another kintsugi daemon (pid " in said and str(first.pid) in said
            assert str(r.data_root / "journal.sqlite") in said
            view = await r.wait_for("done", timeout_s=120)  # the first one ran on, undisturbed
            assert view.status is not None and online.status is not None
            assert view.status["session"] == online.status["session"]
            assert first.returncode is None
        finally:
            first.terminate()
            assert await asyncio.wait_for(first.wait(), 60) == 0


async def test_start_names_a_recipe_and_never_opens_a_path(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "nmc811-fast.toml").write_text(drill_recipe(1))
    async with rig(tmp_path, time_scale=0.0) as r:
        daemon = await r.start_daemon("daemon.log", extra_settings=f'recipes_dir = "{recipes}"')
        try:
            await r.wait_for("idle")
            op = r.operator()
            old = await op.command("start", {"recipe_path": str(recipes / "nmc811-fast.toml")})
            assert not old["accepted"] and "recipe_path" in old["error"]  # the field no longer exists
            for probe in ("../daemon", "/etc/passwd", ".."):
                reply = await op.command("start", {"recipe_name": probe})
                assert not reply["accepted"] and "recipe_name" in reply["error"]
            missing = await op.command("start", {"recipe_name": "nope"})
            assert not missing["accepted"] and str(recipes) not in missing["error"]  # says nothing of disks
            assert missing["error"] == "no readable recipe named 'nope' in the daemon's recipe folder"
            started = await op.command("start", {"recipe_name": "nmc811-fast"})
            assert started["accepted"], started
            await r.wait_for("done", timeout_s=60)
        finally:
            daemon.terminate()
            assert await asyncio.wait_for(daemon.wait(), 60) == 0


def test_start_cli_sends_a_name(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", "start", "x.toml", "--name", "y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
