"""`kintsugi-sim dataset` and `kintsugi demo` as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from simulator.materials import CANONICAL_CLASSES


def run(args: list[str], cache: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "KINTSUGI_SIM_CACHE": str(cache), "HOME": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env
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
            assert labels.shape == (128, 160) and set(np.unique(labels)) <= set(CANONICAL_CLASSES.values())
            pore_pixels[variant] += int((labels == CANONICAL_CLASSES["pore"]).sum())
    # Same planes in both variants; only the Pt-filled pores differ.
    positions = [[s["face_position_m"] for s in m["slices"]] for m in manifests.values()]
    assert positions[0] == positions[1]
    assert pore_pixels["with-pt"] > 0 and pore_pixels["without-pt"] == 0
    assert not list(out.rglob(".*.tmp"))  # no temp files left behind


def test_dataset_rejects_bad_preset(tmp_path: Path, sim_cache: Path) -> None:
    proc = run(["simulator.cli", "dataset", "--out", str(tmp_path), "--preset", "50:25:25"], sim_cache)
    assert proc.returncode == 2 and "50:25:25" in proc.stderr


def test_demo_runs_and_summarises(tmp_path: Path, sim_cache: Path) -> None:
    proc = run(
        [
            "kintsugi_daemon.cli",
            "demo",
            "--slices",
            "3",
            "--time-scale",
            "0",
            "--width-px",
            "192",
            "--height-px",
            "128",
            "--out",
            str(tmp_path),
        ],
        sim_cache,
    )
    assert proc.returncode == 0, proc.stderr
    assert "kintsugi demo summary" in proc.stdout
    (run_dir,) = list(tmp_path.iterdir())
    assert str(run_dir.resolve()) in proc.stdout
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["summary"]["slices"] == 3
    positions = [s["face_position_m"] for s in manifest["slices"]]
    assert positions == sorted(positions) and positions[0] > 0
    for s in manifest["slices"]:
        for name in s["images"].values():
            assert tifffile.imread(run_dir / name).shape == (128, 192)


def test_demo_rejects_bad_arguments(tmp_path: Path, sim_cache: Path) -> None:
    proc = run(["kintsugi_daemon.cli", "demo", "--slices", "0", "--out", str(tmp_path)], sim_cache)
    assert proc.returncode == 2 and "--slices" in proc.stderr
