"""`kintsugi report` on a real demo run, opened in headless Chromium (Debian's `chromium`).

The screenshot is kept in test-artifacts/report/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "report"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIGURES = ["timeline", "montage", "fractions", "cracks", "pore-sizes"]


def kintsugi(args: list[str], cache: Path, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_")}
    return subprocess.run(
        [sys.executable, "-m", "kintsugi_daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**env, "KINTSUGI_SIM_CACHE": str(cache)},
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, sim_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("demo")
    small = ["--slices", "4", "--time-scale", "0", "--width-px", "256", "--height-px", "192"]
    proc = kintsugi(["demo", *small, "--out", str(out)], sim_cache)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1].split()[-1])


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_command_writes_html_and_pdf(demo_run: Path, tmp_path: Path, sim_cache: Path) -> None:
    proc = kintsugi(["report", str(demo_run), "--out", str(tmp_path)], sim_cache)
    assert proc.returncode == 0, proc.stderr
    html_path, pdf_path = (Path(line) for line in proc.stdout.split())
    assert html_path.parent == pdf_path.parent == tmp_path
    text = html_path.read_text()
    for key in FIGURES:
        assert f'id="figure-{key}"' in text
    assert "4 of 4" in text and "EDX" in text
    assert pdf_path.read_bytes().startswith(b"%PDF")


def test_bad_run_directory_is_a_clear_error(tmp_path: Path, sim_cache: Path) -> None:
    proc = kintsugi(["report", str(tmp_path)], sim_cache)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'run.json'}: no such file" in proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(demo_run: Path) -> None:
    """The demo's own report, as a person opens it: every figure decodes, the page is not blank."""
    (html_path,) = (demo_run / "report").glob("*_report.html")
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", html_path.as_uri())
    assert dom.returncode == 0, dom.stderr
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body is not None
    assert f'data-figures="{len(FIGURES)}"' in body.group(0)
    assert f'data-figures-loaded="{len(FIGURES)}"' in body.group(0)  # set by the page once images decode

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    done = chromium("--window-size=1100,2600", f"--screenshot={shot}", html_path.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr
    with Image.open(shot) as im:
        assert im.size == (1100, 2600)
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    assert grey.std() > 20  # figures and text, not an empty white page
