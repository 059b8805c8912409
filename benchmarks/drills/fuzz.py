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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks.drills.rig import INSTRUMENT_ID, Rig, drill_recipe, rig
from kintsugi_daemon.demo.broker import Access
from kintsugi_daemon.demo.broker_acl import ALL
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


def _one(rng: random.Random, recipe: str) -> tuple[str, str, bytes]:
    """(kind, verb, payload): one command with exactly one defect. (A retained command is not among them:
    the broker forwards a live publish with the retain flag cleared, so only a replay on reconnect can
    be refused as retained; tests/integration/test_mqtt.py covers that.)"""
    verb = rng.choice(VERBS)
    kind = rng.choice(
        [
            "bytes",
            "not_object",
            "nan",
            "no_command_id",
            "bad_command_id",
            "no_sent_at",
            "unknown_field",
            "wrong_type",
            "stale",
            "future",
            "unknown_verb",
            "recipe_path",
            "recipe_name_traversal",
            "forbidden_start",
            "oversized",
        ]
    )
    body: Any = _fresh()
    if kind == "bytes":
        return kind, verb, rng.randbytes(rng.randint(0, 200))
    if kind == "not_object":
        return kind, verb, json.dumps(rng.choice([[1, 2], "abort", 42, None, True])).encode()
    if kind == "nan":
        return kind, "pause", b'{"command_id": "' + uuid.uuid4().hex.encode() + b'", "sent_at": NaN}'
    if kind == "no_command_id":
        del body["command_id"]
    elif kind == "bad_command_id":
        body["command_id"] = rng.choice(["short", 12345678, "x" * 65, "has space in it", "../../etc"])
    elif kind == "no_sent_at":
        del body["sent_at"]
    elif kind == "unknown_field":
        body[rng.choice(["speed", "force", "recipe_pathx", "now!"])] = 1
    elif kind == "wrong_type":
        verb = "pause"
        body["now"] = rng.choice(["yes", 1, None, [True]])
    elif kind == "stale":
        body["sent_at"] = time.time() - rng.uniform(61, 1e6)
    elif kind == "future":
        body["sent_at"] = time.time() + rng.uniform(11, 1e6)
    elif kind == "unknown_verb":
        verb = rng.choice(["reboot", "vent", "ä", "START", "start_now", "x" * 40])
    elif kind == "recipe_path":
        verb, body["recipe_path"] = "start", rng.choice(["/etc/passwd", "/etc/kintsugi/daemon.toml"])
    elif kind == "recipe_name_traversal":
        verb, body["recipe_name"] = "start", rng.choice(["../daemon", "/etc/passwd", "..", ".hidden"])
    elif kind == "forbidden_start":
        verb, body["recipe"] = "start", recipe  # valid, but a run is on (paused)
    elif kind == "oversized":
        body["pad"] = "x" * 70_000
    if verb == "start" and kind not in ("recipe_path", "recipe_name_traversal", "forbidden_start"):
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

            replies = _Replies()
            expected = 0
            unauthorised_ids: list[str] = []
            t0 = time.monotonic()
            async with _connect(r, "operator") as op:
                await op.subscribe(f"kintsugi/v1/{INSTRUMENT_ID}/cmd/+/reply", qos=1)
                listen = asyncio.create_task(replies.collect(op))
                intruders = {u: await _enter(_connect(r, u)) for u in UNAUTHORISED}
                try:
                    for i in range(commands):
                        kind, verb, payload = _one(rng, recipe)
                        await op.publish(f"kintsugi/v1/{INSTRUMENT_ID}/cmd/{verb}", payload, qos=1)
                        expected += 1
                        report.kinds[kind] += 1
                        if i % 10 == 0:
                            body = _fresh()
                            unauthorised_ids.append(body["command_id"])
                            user = UNAUTHORISED[(i // 10) % len(UNAUTHORISED)]
                            await intruders[user].publish(
                                f"kintsugi/v1/{INSTRUMENT_ID}/cmd/abort", json.dumps(body), qos=1
                            )
                    report.sent, report.unauthorised = expected, len(unauthorised_ids)
                    replies.expect(expected)
                    with contextlib.suppress(TimeoutError):  # a missing reply shows in `unanswered`
                        await asyncio.wait_for(replies.all_in.wait(), REPLY_WAIT_S)
                finally:
                    listen.cancel()
                    for client in intruders.values():
                        await client.__aexit__(None, None, None)
            report.wall_s = time.monotonic() - t0
            report.replies = len(replies.seen)
            report.accepted = sum(1 for reply in replies.seen if reply.get("accepted"))
            report.unanswered = expected - len(replies.seen)
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
