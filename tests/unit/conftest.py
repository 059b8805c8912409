"""Unit tests: one module at a time, in-process (real ONNX models, real files)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory: pytest.TempPathFactory, sim_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("segment-ds")
    env = {"PATH": "/usr/bin:/bin", "KINTSUGI_SIM_CACHE": str(sim_cache), "HOME": str(sim_cache)}
    args = ["--slices", "3", "--seed", "5", "--width-px", "160", "--height-px", "128"]
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "dataset", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return out / "with-pt"
