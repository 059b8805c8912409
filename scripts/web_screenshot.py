"""Regenerate docs/web-page.png: a demo-sized run (shipped model, 1024 x 768) watched by `kintsugi web` in
headless Chromium, captured mid-run. Needs mosquitto and chromium (see .ci/run); about two minutes.

    .venv/bin/python scripts/web_screenshot.py [--out docs/web-page.png] [--slices 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

from kintsugi_daemon.cli.remote import Operator
from kintsugi_daemon.config import MqttSettings
from kintsugi_daemon.demo.broker import LocalBroker
from kintsugi_daemon.demo.harness import DemoOptions, demo_recipe
from kintsugi_daemon.demo.simulator_process import start_simulator

PASSWORDS = {"daemon": "d-screenshot", "operator": "o-screenshot", "monitor": "m-screenshot"}


async def main(out: Path, slices: int) -> None:
    opts = DemoOptions(slices=slices, time_scale=0.02)
    with tempfile.TemporaryDirectory(prefix="kintsugi-shot-") as tmp:
        async with contextlib.AsyncExitStack() as stack:
            await shoot(Path(tmp), stack, opts, out)


async def shoot(root: Path, stack: contextlib.AsyncExitStack, opts: DemoOptions, out: Path) -> None:
    slices = opts.slices
    broker = LocalBroker(root / "broker", passwords=PASSWORDS)
    broker.start()
    stack.callback(broker.stop)
    sim_args = [
        *("--time-scale", repr(opts.time_scale), "--slices", str(slices), "--preset", opts.preset),
        *("--width-px", str(opts.width_px), "--height-px", str(opts.height_px)),
        *("--pixel-size-m", repr(opts.pixel_size_m)),
    ]
    sim = await stack.enter_async_context(start_simulator(sim_args, log_path=root / "sim.log"))
    settings = root / "settings.toml"
    settings.write_text(f"""
instrument_id = "hydra-01"
data_root = "{root / "runs"}"
[mqtt]
port = {broker.port}
username = "daemon"
password = "{PASSWORDS["daemon"]}"
[instrument]
url = "{sim.url}"
token = "{sim.token}"
deadline_scale = 0.05
[web]
port = 0
password = "{PASSWORDS["monitor"]}"
""")
    cli = [sys.executable, "-m", "kintsugi_daemon.cli"]
    daemon = await asyncio.create_subprocess_exec(
        *cli, "serve", "--config", str(settings), stdout=(root / "daemon.log").open("wb"), stderr=-2
    )
    stack.callback(daemon.terminate)
    web = await asyncio.create_subprocess_exec(
        *cli, "web", "--config", str(settings), stdout=asyncio.subprocess.PIPE
    )
    stack.callback(web.terminate)
    assert web.stdout is not None
    line = (await web.stdout.readline()).decode()
    url = re.search(r"(http://\S+)", line)
    assert url, line
    operator = Operator(
        MqttSettings(port=broker.port, username="operator", password=PASSWORDS["operator"]), "hydra-01"
    )
    await operator.watch(lambda v: bool(v.status and v.status.get("path") == "idle"), 60)
    reply = await operator.command("start", {"recipe": demo_recipe(opts, segmentation=True)})
    assert reply["accepted"], reply
    target = slices * 3 // 4
    await operator.watch(lambda v: bool(v.progress and v.progress.get("slice", 0) >= target), 600)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(url.group(1))
        await page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
        await page.wait_for_timeout(500)  # let the canvas plots settle after the last update
        await page.screenshot(path=str(out))
        await browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/web-page.png"))
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.out, args.slices))
