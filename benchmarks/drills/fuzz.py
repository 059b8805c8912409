"""Fuzzed and unauthorised MQTT commands against a running daemon (paused mid-run, so a command that got
through would show): every authorised one is refused with a reply, every unauthorised one is dropped by
the broker's ACL (never reaches the daemon), and the run's state, journal and files are unchanged.

Each generated command carries exactly one defect (so none is a valid, allowed command by accident):
random bytes, JSON that is not an object, NaN, missing or malformed fields, unknown fields, wrong types,
stale or future `sent_at`, an unknown verb, a path where
a recipe name belongs, an oversized payload, or a valid `start` the paused state forbids. Unauthorised
ones are valid `abort`s sent by identities the ACL does not let command this instrument: the monitor,
another instrument's daemon, and an operator granted only that other instrument.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks.drills.rig import INSTRUMENT_ID, Rig, drill_recipe, rig
from kintsugi_daemon.demo.broker import Access
from kintsugi_daemon.demo.broker_acl import ALL
from kintsugi_daemon.service import mqtt_client
from kintsugi_daemon.service.journal import Journal

__all__ = ["FuzzReport", "fuzz_drill"]

OTHER = "drill-02"
ACCESS = Access(
    instruments=(INSTRUMENT_ID, OTHER),
    operators={"operator": (ALL,), "alice": (OTHER,)},
    monitors={"monitor": (ALL,)},
)
UNAUTHORISED = ("monitor", OTHER, "alice")
VERBS = ("start", "pause", "resume", "stop", "abort", "halt", "clear")
REPLY_WAIT_S = 120.0


@dataclass
class FuzzReport:
    sent: int = 0
    unauthorised: int = 0
    replies: int = 0
    accepted: int = 0
    unanswered: int = 0
    reached_daemon_unauthorised: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    state_before: dict[str, Any] = field(default_factory=dict)
    state_after: dict[str, Any] = field(default_factory=dict)
    files_unchanged: bool = False
    face_unchanged: bool = False
    finished_after: bool = False
    wall_s: float = 0.0

    @property
    def rate_per_s(self) -> float:
        return self.sent / self.wall_s if self.wall_s else 0.0


def _fresh(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"command_id": uuid.uuid4().hex, "sent_at": time.time(), **(extra or {})}


def _raw_defects() -> dict[str, Callable[[random.Random], bytes]]:
    """Payloads that are not a command at all."""
    return {
        # At least one byte: an empty payload is MQTT's "clear the retained message", which the daemon
        # ignores by design (no command, no reply); it would count as unanswered.
        "bytes": lambda rng: rng.randbytes(rng.randint(1, 200)),
        "not_object": lambda rng: json.dumps(rng.choice([[1, 2], "abort", 42, None, True])).encode(),
        "nan": lambda rng: b'{"command_id": "' + uuid.uuid4().hex.encode() + b'", "sent_at": NaN}',
    }


def _body_defects(recipe: str) -> dict[str, Callable[[dict[str, Any], random.Random], str | None]]:
    """One defect each, written into a valid body; returns the verb to send it to, if it must be one."""

    def put(
        key: str, value: Any, verb: str | None = None
    ) -> Callable[[dict[str, Any], random.Random], str | None]:
        def apply(body: dict[str, Any], _: random.Random) -> str | None:
            body[key] = value
            return verb

        return apply

    def drop(key: str) -> Callable[[dict[str, Any], random.Random], str | None]:
        return lambda body, _: body.pop(key) and None

    return {
        "no_command_id": drop("command_id"),
        "bad_command_id": lambda b, r: put(
            "command_id", r.choice(["short", 12345678, "x" * 65, "a b c d e"])
        )(b, r),
        "no_sent_at": drop("sent_at"),
        "unknown_field": lambda b, r: put(r.choice(["speed", "force", "recipe_pathx", "now!"]), 1)(b, r),
        "wrong_type": lambda b, r: put("now", r.choice(["yes", 1, None, [True]]), "pause")(b, r),
        "stale": lambda b, r: put("sent_at", time.time() - r.uniform(61, 1e6))(b, r),
        "future": lambda b, r: put("sent_at", time.time() + r.uniform(11, 1e6))(b, r),
        "unknown_verb": lambda b, r: r.choice(["reboot", "vent", "ä", "START", "start_now", "x" * 40]),
        "recipe_path": lambda b, r: put(
            "recipe_path", r.choice(["/etc/passwd", "/etc/kintsugi/daemon.toml"]), "start"
        )(b, r),
        "recipe_name_traversal": lambda b, r: put(
            "recipe_name", r.choice(["../daemon", "/etc/passwd", ".."]), "start"
        )(b, r),
        "forbidden_start": put("recipe", recipe, "start"),  # valid, but a run is on (paused)
        "oversized": put("pad", "x" * 70_000),
    }


def _one(rng: random.Random, recipe: str) -> tuple[str, str, bytes]:
    """(kind, verb, payload): one command with exactly one defect. (A retained command is not among them:
    the broker forwards a live publish with the retain flag cleared, so only a replay on reconnect can
    be refused as retained; tests/integration/test_mqtt.py covers that.)"""
    raw, defects = _raw_defects(), _body_defects(recipe)
    kind = rng.choice([*raw, *defects])
    verb = rng.choice(VERBS)
    if kind in raw:
        return kind, verb, raw[kind](rng)
    body = _fresh()
    verb = defects[kind](body, rng) or verb
    if verb == "start" and "recipe" not in body and "recipe_path" not in body and "recipe_name" not in body:
        body["recipe"] = recipe  # so only the chosen defect is wrong
    return kind, verb, json.dumps(body).encode()


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _connect(r: Rig, user: str) -> aiomqtt.Client:
    name, password = r.broker.credentials(user)
    return aiomqtt.Client(
        r.broker.host,
        r.broker.port,
        username=name,
        password=password,
        identifier=f"fuzz-{user}-{uuid.uuid4().hex[:6]}",
        socket_options=mqtt_client.NO_DELAY,  # as the operator CLI's client
    )


async def fuzz_drill(root: Path, *, commands: int, seed: int = 0) -> FuzzReport:
    """`commands` authorised fuzzed commands plus one unauthorised `abort` for every ten."""
    rng = random.Random(seed)
    report = FuzzReport()
    recipe = drill_recipe(3)
    async with rig(root, time_scale=0.15, access=ACCESS) as r:
        daemon = await r.start_daemon("daemon.log")
        try:
            await r.wait_for("idle")
            assert (await r.operator().command("start", {"recipe": recipe}))["accepted"]
            await r.wait_for("running.image")
            assert (await r.operator().command("pause", {"now": False}))["accepted"]
            view = await r.wait_for("paused")
            report.state_before = dict(view.status or {})
            run_dir = next(p for p in r.data_root.iterdir() if p.is_dir())
            digest, face = _tree_digest(run_dir), await r.sim_get("/test/face")
            journal = Journal(r.data_root / "journal.sqlite", "inspector")
            run_before = journal.active_run()

            t0 = time.monotonic()
            replies, unauthorised_ids = await _flood(r, rng, recipe, commands, report)
            report.wall_s = time.monotonic() - t0
            report.replies = len(replies.seen)
            report.accepted = sum(1 for reply in replies.seen if reply.get("accepted"))
            report.unanswered = report.sent - len(replies.seen)
            answered = {reply.get("command_id") for reply in replies.seen}
            report.reached_daemon_unauthorised = sum(
                1 for cid in unauthorised_ids if cid in answered or journal.command_reply(cid) is not None
            )
            view = await r.operator().snapshot()
            report.state_after = dict(view.status or {})
            run_after = journal.active_run()
            report.files_unchanged = _tree_digest(run_dir) == digest and run_after == run_before
            report.face_unchanged = await r.sim_get("/test/face") == face
            journal.close()
            # The daemon is well: the run resumes and finishes.
            assert (await r.operator().command("resume"))["accepted"]
            await r.wait_for("done", timeout_s=120)
            report.finished_after = True
        finally:
            daemon.terminate()
            await asyncio.wait_for(daemon.wait(), 60)
    return report


async def _flood(
    r: Rig, rng: random.Random, recipe: str, commands: int, report: FuzzReport
) -> tuple[_Replies, list[str]]:
    """Send the fuzzed commands as the operator and, every tenth, a valid `abort` as an intruder; wait
    (bounded) for the replies. Returns the replies and the intruders' command ids."""
    replies = _Replies()
    unauthorised_ids: list[str] = []
    async with _connect(r, "operator") as op:
        await op.subscribe(f"kintsugi/v1/{INSTRUMENT_ID}/cmd/+/reply", qos=1)
        listen = asyncio.create_task(replies.collect(op))
        intruders = {u: await _enter(_connect(r, u)) for u in UNAUTHORISED}
        try:
            for i in range(commands):
                kind, verb, payload = _one(rng, recipe)
                await op.publish(f"kintsugi/v1/{INSTRUMENT_ID}/cmd/{verb}", payload, qos=1)
                report.kinds[kind] += 1
                if i % 10 == 0:
                    body = _fresh()
                    unauthorised_ids.append(body["command_id"])
                    user = UNAUTHORISED[(i // 10) % len(UNAUTHORISED)]
                    await intruders[user].publish(
                        f"kintsugi/v1/{INSTRUMENT_ID}/cmd/abort", json.dumps(body), qos=1
                    )
            report.sent, report.unauthorised = commands, len(unauthorised_ids)
            replies.expect(commands)
            with contextlib.suppress(TimeoutError):  # a missing reply shows in `unanswered`
                await asyncio.wait_for(replies.all_in.wait(), REPLY_WAIT_S)
        finally:
            listen.cancel()
            for client in intruders.values():
                await client.__aexit__(None, None, None)
    return replies, unauthorised_ids


async def _enter(client: aiomqtt.Client) -> aiomqtt.Client:
    await client.__aenter__()
    return client


class _Replies:
    """Replies as they arrive; `all_in` is set once `expect(n)` is met."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.all_in = asyncio.Event()
        self._target: int | None = None

    def expect(self, n: int) -> None:
        self._target = n
        self._check()

    def _check(self) -> None:
        if self._target is not None and len(self.seen) >= self._target:
            self.all_in.set()

    async def collect(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if isinstance(message.payload, bytes):
                self.seen.append(json.loads(message.payload))
                self._check()
