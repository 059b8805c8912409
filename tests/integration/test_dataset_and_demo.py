"""`kintsugi-sim dataset` and `kintsugi demo` as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kintsugi_daemon.demo.broker import LocalBroker
from kintsugi_daemon.inference.contract import SHIPPED_MODEL
from simulator.materials import CANONICAL_CLASSES, OUTSIDE_LABEL


def run(
    args: list[str], cache: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "KINTSUGI_SIM_CACHE": str(cache), "HOME": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=base | (env or {})
    )


def test_dataset_export_contract(tmp_path: Path, sim_cache: Path) -> None:
    out = tmp_path / "ds"
    proc = run(
        [
            "simulator.cli",
            "dataset",
            "--out",
            str(out),
            "--slices",
            "3",
            "--seed",
            "5",
            "--width-px",
            "160",
            "--height-px",
            "128",
        ],
        sim_cache,
    )
    assert proc.returncode == 0, proc.stderr
    manifests = {v: json.loads((out / v / "dataset.json").read_text()) for v in ("with-pt", "without-pt")}
    pore_pixels = {}
    for variant, m in manifests.items():
        assert m["detectors"] == ["cbs", "tld"]
        assert (
            m["classes"]
            == CANONICAL_CLASSES
            == {"pore": 0, "unfilled_pore": 1, "active": 2, "cbd": 3, "collector": 4}
        )
        assert m["pixel_size_m"] == 4.05e-8
        assert [s["index"] for s in m["slices"]] == [0, 1, 2]
        pore_pixels[variant] = 0
        for s in m["slices"]:
            assert s["images"] == {"cbs": f"{s['index']:04d}_cbs.tif", "tld": f"{s['index']:04d}_tld.tif"}
            for name in s["images"].values():
                image = tifffile.imread(out / variant / name)
                assert image.dtype == np.uint16 and image.shape == (128, 160)
            labels = tifffile.imread(out / variant / s["labels"])
            assert labels.shape == (128, 160)
            assert set(np.unique(labels)) <= {*CANONICAL_CLASSES.values(), OUTSIDE_LABEL}
            assert np.all(labels[:5] == OUTSIDE_LABEL)  # the Pt cap at the top of the frame is no class
            pore_pixels[variant] += int((labels == CANONICAL_CLASSES["pore"]).sum())
    # Same planes in both variants; only the Pt-filled pores differ.
    positions = [[s["face_position_m"] for s in m["slices"]] for m in manifests.values()]
    assert positions[0] == positions[1]
    assert pore_pixels["with-pt"] > 0 and pore_pixels["without-pt"] == 0
    assert not list(out.rglob(".*.tmp"))  # no temp files left behind


def test_dataset_rejects_bad_preset(tmp_path: Path, sim_cache: Path) -> None:
    proc = run(["simulator.cli", "dataset", "--out", str(tmp_path), "--preset", "50:25:25"], sim_cache)
    assert proc.returncode == 2 and "50:25:25" in proc.stderr


SMALL_DEMO = ["--slices", "3", "--time-scale", "0", "--width-px", "192", "--height-px", "128"]


def run_demo(out: Path, cache: Path, *extra: str, env: dict[str, str] | None = None) -> Path:
    """Run `kintsugi demo` on a small field of view; check what a user relies on; return the demo folder."""
    proc = run(["kintsugi_daemon.cli", "demo", *SMALL_DEMO, "--out", str(out), *extra], cache, 60, env)
    assert proc.returncode == 0, proc.stderr
    assert "kintsugi demo summary" in proc.stdout
    assert "slices            3 of 3 requested" in proc.stdout
    (demo_dir,) = list(out.iterdir())
    (run_dir,) = [p for p in (demo_dir / "runs").iterdir() if p.is_dir()]
    # The output folder is the run directory, on the summary's last line.
    assert proc.stdout.strip().splitlines()[-1].split()[-1] == str(run_dir.resolve())

    # The morning report is written at the end; its path is on the summary's line before the folder.
    report = Path(proc.stdout.strip().splitlines()[-2].removeprefix("  report").strip())
    assert report == run_dir.resolve() / "report" / f"{run_dir.name}_report.html"
    assert report.is_file() and report.with_suffix(".pdf").is_file()
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["state"] == "done" and manifest["completed_slices"] == manifest["total_slices"] == 3
    for index in range(3):
        record = json.loads((run_dir / "slices" / f"{index:04d}.json").read_text())
        assert set(record["files"]) >= {"cbs", "tld"}
        for name in ("cbs", "tld"):
            image = tifffile.imread(run_dir / record["files"][name])
            assert image.dtype == np.uint16 and image.shape == (128, 192)
        if SHIPPED_MODEL.is_file():  # segmentation joins the run when the model is shipped
            seg = json.loads((run_dir / "slices" / f"{index:04d}.segmentation.json").read_text())
            assert tifffile.imread(run_dir / seg["files"]["labels"]).shape == (128, 192)
    positions = [
        json.loads((run_dir / "slices" / f"{i:04d}.json").read_text())["metadata"]["face_position_m"]
        for i in range(3)
    ]
    assert positions == sorted(positions) and positions[0] > 0
    assert "daemon            exited with status 0, said offline" in proc.stdout
    # The daemon's log is JSON throughout: the MQTT link's standard-library lines included.
    log_lines = (demo_dir / "logs" / "daemon.log").read_text().splitlines()
    assert any("mqtt: connected" in line for line in log_lines)
    for line in log_lines:
        assert isinstance(json.loads(line), dict), line
    # The adaptive policy by default: each slice's observation and decisions on record, listed in the summary.
    assert "adaptation        adaptive:" in proc.stdout
    adapt = json.loads((run_dir / "slices" / "0001.adapt.json").read_text())
    assert adapt["policy"] == "adaptive" and adapt["observation"]["fiducial"]["score"] > 0.75

    # Broker, simulator and daemon are all gone.
    pids = json.loads((demo_dir / "pids.json").read_text())
    assert pids["simulator"] and pids["daemon"]
    for name, pid in pids.items():
        if pid is not None:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            print(f"{name} {pid} gone")
    return demo_dir


def test_demo_runs_and_summarises(tmp_path: Path, sim_cache: Path) -> None:
    demo_dir = run_demo(tmp_path, sim_cache)
    assert json.loads((demo_dir / "pids.json").read_text())["broker"]  # it started its own


def test_demo_on_the_embedded_broker(tmp_path: Path, sim_cache: Path) -> None:
    """A machine without Mosquitto still runs the demo: an amqtt broker in its own process."""
    demo_dir = run_demo(tmp_path, sim_cache, env={"KINTSUGI_DEMO_EMBEDDED_BROKER": "1"})
    assert (demo_dir / "broker" / "amqtt.json").is_file()
    assert "embedded amqtt broker" in (demo_dir / "broker" / "broker.log").read_text()


def test_demo_with_a_given_broker(tmp_path: Path, sim_cache: Path) -> None:
    """`--broker`: the demo starts no broker of its own; the daemon and the demo take their ACL roles."""
    with LocalBroker(tmp_path / "broker", instruments=["facility-hydra"]) as broker:
        operator, operator_pw = broker.credentials("operator")
        daemon, daemon_pw = broker.credentials("facility-hydra")  # a daemon's user is its instrument id
        url = f"mqtt://{operator}@{broker.host}:{broker.port}"  # the password never on a command line
        env = {
            "KINTSUGI_MQTT__USERNAME": daemon,
            "KINTSUGI_MQTT__PASSWORD": json.dumps(daemon_pw),
            "KINTSUGI_DEMO_BROKER_PASSWORD": operator_pw,
        }
        demo_dir = run_demo(tmp_path / "out", sim_cache, "--broker", url, env=env)
        assert json.loads((demo_dir / "pids.json").read_text())["broker"] is None
        assert not (demo_dir / "broker").exists()
        assert broker.running  # the demo left the given broker alone


def test_demo_rejects_bad_arguments(tmp_path: Path, sim_cache: Path) -> None:
    proc = run(["kintsugi_daemon.cli", "demo", "--slices", "0", "--out", str(tmp_path)], sim_cache)
    assert proc.returncode == 2 and "--slices" in proc.stderr
    proc = run(["kintsugi_daemon.cli", "demo", "--broker", "http://x:1", "--out", str(tmp_path)], sim_cache)
    assert proc.returncode == 2 and "--broker" in proc.stderr
    url = "mqtt://operator:s3cret@127.0.0.1:1883"
    proc = run(["kintsugi_daemon.cli", "demo", "--broker", url, "--out", str(tmp_path)], sim_cache)
    assert proc.returncode == 2 and "KINTSUGI_DEMO_BROKER_PASSWORD" in proc.stderr  # no secret in argv
    assert not list(tmp_path.iterdir())  # refused before anything was created
