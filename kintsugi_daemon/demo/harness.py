"""`kintsugi demo`: the main job. Broker, simulator and daemon as real processes, one run, a summary.

The demo is an operator like any other: it writes a settings file and a recipe, starts an MQTT broker
(Mosquitto if installed, else the embedded one; or uses `--broker`), the simulator and `kintsugi serve`,
sends `start` over MQTT, follows the daemon's progress and events, and when the run has finished stops
everything in order (daemon first: it says `offline`) and summarises the run from the files the daemon
wrote (run.json, slices/*.json) and its journal, read-only.

```
<out>/<demo-id>/
  settings.toml  recipe.toml  pids.json
  logs/daemon.log  logs/simulator.log  broker/broker.log (+ its config, password file, ACL)
  runs/journal.sqlite
  runs/<run-id>/                 the run directory: what a real run leaves (storage.py)
```
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from kintsugi_daemon.cli.remote import DaemonView, Operator
from kintsugi_daemon.config import ConfigError, MqttSettings, load_settings, parse_recipe
from kintsugi_daemon.demo.bridge_process import start_bridge
from kintsugi_daemon.demo.broker import LocalBroker, child_preexec
from kintsugi_daemon.demo.demo_files import demo_recipe, settings_toml
from kintsugi_daemon.demo.live_view import RunWatch
from kintsugi_daemon.demo.simulator_process import SimulatorProcess, start_simulator
from kintsugi_daemon.demo.summary import print_summary, summarise
from kintsugi_daemon.drivers.base import InstrumentError
from kintsugi_daemon.drivers.http_client import HttpDualBeam
from kintsugi_daemon.inference.contract import SHIPPED_MODEL

__all__ = ["DemoOptions", "demo_recipe", "parse_broker_url", "run_demo"]

EMBEDDED_ENV = "KINTSUGI_DEMO_EMBEDDED_BROKER"  # "1": use the embedded broker even if Mosquitto exists
BROKER_PASSWORD_ENV = "KINTSUGI_DEMO_BROKER_PASSWORD"  # the --broker user's password
ONLINE_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 60.0
FAULT_ABORT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DemoOptions:
    slices: int = 24
    time_scale: float = 0.01
    out: Path = Path("demo-output")
    width_px: int = 1024
    height_px: int = 768
    pixel_size_m: float = 40.5e-9  # the published kintsugi setting, and the shipped model's pixel size
    slice_thickness_m: float = 40e-9
    seed: int = 0
    preset: str = "94:3:3"
    broker: str | None = None
    embedded_broker: bool = False
    bridge: str | None = (
        None  # "demo": `kintsugi bridge --backend demo` (OpenFIBSEM) instead of the simulator
    )
    policy: Literal["fixed", "adaptive"] = "adaptive"  # the published schedule, or the closed loop

    def __post_init__(self) -> None:
        if self.bridge not in (None, "demo"):
            raise ValueError(
                f"--bridge must be demo (the others drive a real microscope), got {self.bridge!r}"
            )
        if not 1 <= self.slices <= 2000:
            raise ValueError(f"--slices must be between 1 and 2000, got {self.slices}")
        if not 0 <= self.time_scale <= 10:
            raise ValueError(f"--time-scale must be between 0 and 10, got {self.time_scale}")
        if not (64 <= self.width_px <= 6144 and 64 <= self.height_px <= 4096):
            raise ValueError(
                f"--width-px/--height-px must be within 64..6144 x 64..4096, got {self.width_px} x "
                f"{self.height_px}"
            )
        if self.broker is not None:
            parse_broker_url(self.broker)


def parse_broker_url(url: str, env: Mapping[str, str] | None = None) -> MqttSettings:
    """`mqtt://[user@]HOST[:PORT]` -> MQTT settings (port 1883 by default). The user's password comes from
    `$KINTSUGI_DEMO_BROKER_PASSWORD`, never from the URL: a command line is visible to every local user."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"--broker must look like mqtt://[user@]HOST:PORT, got {url!r}")
    if parts.password is not None:
        raise ValueError(
            f"--broker: put no password in the URL (every local user can read a command line); "
            f"set ${BROKER_PASSWORD_ENV} instead"
        )
    try:
        port = parts.port or 1883
    except ValueError:
        raise ValueError(f"--broker has a bad port: {url!r}") from None
    return MqttSettings(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=(os.environ if env is None else env).get(BROKER_PASSWORD_ENV) or None,
    )


def _given_instrument_id() -> str:
    """The instrument id for a run on a given broker: the daemon's user name from the environment
    (KINTSUGI_MQTT__USERNAME) when set, since on a shared broker a daemon's identity is its instrument id;
    else a fresh unique one."""
    try:
        user = load_settings(None).mqtt.username
    except ConfigError:
        user = None
    return user or f"demo-{secrets.token_hex(3)}"


def _say(message: str) -> None:
    print(f"kintsugi demo: {message}", file=sys.stderr, flush=True)


def _daemon_env(keep_mqtt_overrides: bool) -> dict[str, str]:
    """The daemon's environment: the settings file is the whole truth, except that with `--broker` the
    daemon may take its own MQTT role from KINTSUGI_MQTT__USERNAME/PASSWORD (a broker with per-role ACLs).

    Other KINTSUGI_* variables (the simulator's cache, a developer's overrides) would be read as
    settings keys by load_settings and refused, or would silently change the demo."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KINTSUGI_") or (keep_mqtt_overrides and k.startswith("KINTSUGI_MQTT__"))
    }


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:]) or "    (empty log)"


# --- the demo -------------------------------------------------------------------------------------


@dataclass
class _Children:
    """The demo's child processes, stopped in reverse order of start on any exit."""

    pids_path: Path
    pids: dict[str, int | None] = field(default_factory=dict)
    daemon: asyncio.subprocess.Process | None = None

    def record(self, name: str, pid: int | None) -> None:
        self.pids[name] = pid
        self.pids_path.write_text(json.dumps(self.pids, indent=1) + "\n")

    async def stop_daemon(self) -> int | None:
        """SIGTERM: the daemon finishes or safely stops its step, says `offline` and exits."""
        proc = self.daemon
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), DAEMON_STOP_TIMEOUT_S)
            except TimeoutError:
                _say(f"the daemon did not exit {DAEMON_STOP_TIMEOUT_S:g} s after SIGTERM; killing it")
                proc.kill()
                await proc.wait()
        return proc.returncode


async def run_demo(opts: DemoOptions) -> int:  # noqa: C901, PLR0915 - one linear script; left to demo work
    demo_id = datetime.now(UTC).strftime("demo-%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
    demo_dir = (opts.out / demo_id).resolve()
    logs, runs = demo_dir / "logs", demo_dir / "runs"
    logs.mkdir(parents=True)
    runs.mkdir()
    segmentation = _segmentation_on(opts)
    recipe_text = demo_recipe(opts, segmentation)
    parse_recipe(recipe_text, "demo recipe")  # a bad option fails here, before anything starts
    (demo_dir / "recipe.toml").write_text(recipe_text)

    children = _Children(demo_dir / "pids.json")
    main_task = asyncio.current_task()
    assert main_task is not None
    interrupted: list[float] = []
    on_interrupt: list[Callable[[], None]] = []  # set once a run is on: Ctrl-C then aborts it

    def sigint() -> None:
        interrupted.append(time.monotonic())
        if len(interrupted) == 1 and on_interrupt:
            on_interrupt[0]()
        else:
            main_task.cancel()  # before the run, or a second Ctrl-C: stop everything now

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, sigint)
    t_demo = time.monotonic()
    # Unique: a shared broker may hold others' topics.
    instrument_id = _given_instrument_id() if opts.broker else f"demo-{secrets.token_hex(3)}"
    async with contextlib.AsyncExitStack() as stack:
        # --- broker ---
        if opts.broker is not None:
            daemon_mqtt = operator_mqtt = parse_broker_url(opts.broker)
            _say(f"broker: the given one at mqtt://{operator_mqtt.host}:{operator_mqtt.port}")
            children.record("broker", None)
        else:
            broker = LocalBroker(
                demo_dir / "broker",
                embedded=opts.embedded_broker or os.environ.get(EMBEDDED_ENV) == "1",
                instruments=[instrument_id],
            )
            stack.callback(broker.stop)
            broker.start()  # from the main thread: the broker dies with us (PR_SET_PDEATHSIG)
            children.record("broker", broker.pid)
            what = (
                "Mosquitto" if broker.kind == "mosquitto" else "embedded amqtt broker (no mosquitto binary)"
            )
            if broker.kind == "embedded" and opts.embedded_broker is False and os.environ.get(EMBEDDED_ENV):
                what = f"embedded amqtt broker ({EMBEDDED_ENV}=1)"
            _say(f"broker: {what} at {broker.url}")
            user, password = broker.credentials(instrument_id)  # the daemon's identity is its instrument
            daemon_mqtt = MqttSettings(
                host=broker.host,
                port=broker.port,
                username=user,
                password=password,
                protocol="5" if broker.kind == "mosquitto" else "3.1.1",  # amqtt speaks 3.1.1 only
            )
            user, password = broker.credentials("operator")
            operator_mqtt = MqttSettings(host=broker.host, port=broker.port, username=user, password=password)

        # --- instrument: the simulator, or the bridge over OpenFIBSEM's Demo microscope ---
        # The simulator stops on SIGINT, and a terminal's Ctrl-C reaches the whole process group: start it
        # with SIGINT blocked (inherited across exec) so Ctrl-C aborts the run instead of pulling the
        # instrument away under it. The mask is restored as soon as the loop runs again, i.e. after the fork.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        loop.call_soon(signal.pthread_sigmask, signal.SIG_SETMASK, old_mask)
        try:
            sim = await stack.enter_async_context(_instrument_server(opts, demo_dir, logs))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if opts.bridge is None:
            children.record("simulator", sim.process.pid)
            _say(f"simulator ready at {sim.url} (specimen {sim.ready.get('specimen_shape')})")
        else:
            children.record("bridge", sim.process.pid)
            _say(f"bridge ready at {sim.url} ({sim.ready.get('instrument')} via OpenFIBSEM)")
        # Deadlines follow the simulator's time scale; the bridge runs at the instrument's own pace.
        deadline_scale = 1.0 if opts.bridge else max(opts.time_scale, 0.01)

        # --- daemon ---
        settings_path = demo_dir / "settings.toml"
        settings_path.touch(mode=0o600)  # it holds the broker password and the instrument token
        settings_path.write_text(
            settings_toml(instrument_id, runs, daemon_mqtt, sim.url, sim.token, deadline_scale)
        )
        daemon_log = logs / "daemon.log"
        with daemon_log.open("ab") as log:
            children.daemon = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kintsugi_daemon.cli",
                "serve",
                "--config",
                str(settings_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=_daemon_env(keep_mqtt_overrides=opts.broker is not None),
                preexec_fn=child_preexec(os.getpid()),
            )
        stack.push_async_callback(children.stop_daemon)
        children.record("daemon", children.daemon.pid)
        operator = Operator(operator_mqtt, instrument_id)
        await _wait_online(operator, children.daemon, daemon_log)
        _say(f"daemon online as {instrument_id} (log: {daemon_log})")

        # --- the run ---
        watch = RunWatch(total=opts.slices, tty=sys.stderr.isatty())
        watcher = asyncio.create_task(operator.watch(watch.on_update), name="demo-watch")
        daemon_exit = asyncio.create_task(children.daemon.wait(), name="demo-daemon-exit")
        try:
            await _until(watch.subscribed.wait(), watcher, daemon_exit, daemon_log)
            t_run = watch.started = time.monotonic()
            reply = await operator.command("start", {"recipe": recipe_text})
            if not reply.get("accepted"):
                print(f"kintsugi demo: the daemon refused the run: {reply.get('error')}", file=sys.stderr)
                return 1
            _say(f"run started: {opts.slices} slices at time scale {opts.time_scale:g}")

            aborting: list[asyncio.Task[None]] = []  # held so the task is not garbage-collected

            def abort() -> None:
                watch._line("kintsugi demo: Ctrl-C: aborting the run (Ctrl-C again to stop at once) ...")
                aborting.append(loop.create_task(_command_quietly(operator, "abort")))

            on_interrupt.append(abort)
            await _until(_watch_run(watcher, watch), watcher, daemon_exit, daemon_log)
            watch.end_bar()
            if watch.lost is not None:
                raise RuntimeError(
                    f"the daemon went {watch.lost} mid-run; its log ends:\n{_tail(daemon_log)}"
                )
            if watch.faulted is not None:
                _say(f"the run faulted ({watch.faulted}); aborting it")
                await _end_faulted_run(operator, watch)
            wall_run = time.monotonic() - t_run
        finally:
            for task in (watcher, daemon_exit):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        instrument = await _instrument_state(sim.url, sim.token)

        # --- orderly shutdown: daemon first, so it publishes `offline` through a live broker ---
        code = await children.stop_daemon()
        status = (await operator.snapshot(timeout_s=5.0)).status or {}
        daemon_exit_text = f"exited with status {code}, said {status.get('state', '?')}"
        if code != 0:
            _say(f"the daemon {daemon_exit_text}; its log ends:\n{_tail(daemon_log)}")

    run_id = watch.run_id or _only_run(runs)
    run_dir = runs / run_id
    summary = summarise(
        run_dir,
        runs / "journal.sqlite",
        instrument=instrument,
        wall_run_s=wall_run,
        wall_demo_s=time.monotonic() - t_demo,
        events_seen=watch.events,
        alerts=watch.alerts,
        daemon_exit=daemon_exit_text,
    )
    report_ok = await _write_report(run_dir, summary)
    print_summary(summary, run_dir)
    if interrupted:
        return 130
    return 0 if summary["state"] == "done" and code == 0 and report_ok else 1


async def _write_report(run_dir: Path, summary: dict[str, Any]) -> bool:
    """The morning report of the demo's run; its path goes on the summary. False if it failed."""
    if not (run_dir / "run.json").is_file():
        return True  # no run to report on (refused or interrupted before it began)
    from kintsugi_daemon.report import write_report  # matplotlib loads only when a report is due

    try:
        summary["report"] = (await asyncio.to_thread(write_report, run_dir, None)).html
    except Exception as exc:  # the run's data is safe on disk; say why the report is missing
        _say(f"the report could not be written: {type(exc).__name__}: {exc}")
        return False
    return True


async def _until(
    awaitable: Any, watcher: asyncio.Task[DaemonView], daemon_exit: asyncio.Task[int], daemon_log: Path
) -> None:
    """Wait for `awaitable`, failing clearly if the daemon dies or the MQTT watch breaks first."""
    target = awaitable if isinstance(awaitable, asyncio.Task) else asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({target, watcher, daemon_exit}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if target is not watcher and not target.done():
            target.cancel()
    if daemon_exit.done() and not target.done():
        raise RuntimeError(
            f"the daemon exited with status {daemon_exit.result()}; its log ends:\n{_tail(daemon_log)}"
        )
    if watcher.done() and watcher.exception() is not None:
        raise RuntimeError(f"lost the MQTT connection to the broker: {watcher.exception()}")


async def _watch_run(watcher: asyncio.Task[DaemonView], watch: RunWatch, grace_s: float = 5.0) -> None:
    """Until the watch ends, or `grace_s` after run_finished if the closing `done` event never comes."""
    ended = asyncio.ensure_future(watch.finished_event.wait())
    try:
        await asyncio.wait({watcher, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not watcher.done():
            await asyncio.wait({watcher}, timeout=grace_s)
    finally:
        ended.cancel()


def _segmentation_on(opts: DemoOptions) -> bool:
    if opts.bridge is not None:
        _say("segmentation off: the bridge's Demo microscope images noise")
        return False
    if not SHIPPED_MODEL.is_file():
        _say(f"segmentation off: the builtin model is not there yet ({SHIPPED_MODEL})")
        return False
    return True


def _instrument_server(
    opts: DemoOptions, demo_dir: Path, logs: Path
) -> contextlib.AbstractAsyncContextManager[SimulatorProcess]:
    """The simulator sized for this demo, or `kintsugi bridge --backend demo` (`--bridge demo`)."""
    if opts.bridge is not None:
        _say(f"starting kintsugi bridge --backend {opts.bridge} (OpenFIBSEM) ...")
        return start_bridge(opts.bridge, demo_dir / "bridge", log_path=logs / "bridge.log")
    _say("starting the simulator (the first start builds the specimen; cached after) ...")
    sim_args = [
        *("--time-scale", repr(opts.time_scale), "--slices", str(opts.slices)),
        *("--seed", str(opts.seed), "--preset", opts.preset),
        *("--width-px", str(opts.width_px), "--height-px", str(opts.height_px)),
        *("--pixel-size-m", repr(opts.pixel_size_m), "--slice-thickness-m", repr(opts.slice_thickness_m)),
    ]
    return start_simulator(sim_args, log_path=logs / "simulator.log")


async def _wait_online(operator: Operator, daemon: asyncio.subprocess.Process, log: Path) -> None:
    """The daemon's retained status says `online` (bounded; a daemon that dies is reported with its log)."""
    online = asyncio.create_task(
        operator.watch(lambda v: (v.status or {}).get("state") == "online", ONLINE_TIMEOUT_S)
    )
    exited = asyncio.create_task(daemon.wait())
    try:
        await asyncio.wait({online, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            raise RuntimeError(f"the daemon exited with status {exited.result()} at start-up:\n{_tail(log)}")
        try:
            online.result()
        except TimeoutError:
            raise RuntimeError(
                f"the daemon did not come online within {ONLINE_TIMEOUT_S:g} s:\n{_tail(log)}"
            ) from None
    finally:
        for task in (online, exited):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _command_quietly(operator: Operator, verb: str) -> None:
    try:
        reply = await operator.command(verb)
    except Exception as exc:  # the demo goes on watching; the run may already be over
        _say(f"{verb}: no reply ({exc})")
        return
    if not reply.get("accepted"):
        _say(f"{verb}: refused: {reply.get('error')}")


async def _end_faulted_run(operator: Operator, watch: RunWatch) -> None:
    """A faulted run waits for an operator; the demo is that operator: abort it and wait for the end."""
    watch.stop_on_fault = False
    await _command_quietly(operator, "abort")
    with contextlib.suppress(TimeoutError):
        await operator.watch(watch.on_update, FAULT_ABORT_TIMEOUT_S)


async def _instrument_state(url: str, token: str) -> dict[str, float] | None:
    try:
        async with HttpDualBeam(url, token=token) as scope:
            state = await scope.state()
    except (InstrumentError, OSError):
        return None
    return {"instrument_time_s": state.instrument_time_s, "face_position_m": state.face_position_m}


def _only_run(runs: Path) -> str:
    dirs = [p.name for p in runs.iterdir() if p.is_dir()]
    if len(dirs) != 1:
        raise RuntimeError(f"expected one run directory under {runs}, found {dirs}")
    return dirs[0]
