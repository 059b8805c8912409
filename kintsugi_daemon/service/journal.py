"""The durable journal: one SQLite file holding runs, step intents and completions, checkpoints, the event
outbox and the replies to commands.

Why SQLite in WAL with synchronous=FULL: a committed transaction survives a power cut or a SIGKILL, and a
reader (`kintsugi status`, a test) never blocks the daemon. Every state change and the events reporting it
are written in one transaction, so a subscriber can never hear of a change the journal lost, nor the
journal hold a change whose event was never queued. The outbox `seq` comes from SQLite's AUTOINCREMENT
counter, which a rolled-back transaction does not advance and a deleted row does not free: seq is gap-free
and monotonic across restarts and sessions.

Used from one asyncio loop; every call is a short synchronous transaction (milliseconds), fine to call
directly from a coroutine.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kintsugi_daemon.service import failpoints, profiling

__all__ = [
    "SCHEMA_VERSION",
    "EventDraft",
    "Journal",
    "JournalError",
    "JournalSchemaError",
    "OutboxEvent",
    "RunRecord",
    "StepRecord",
]

SCHEMA_VERSION = 1
FINISHED_RUN_STATES = frozenset({"done", "aborted", "stopped"})


class JournalError(RuntimeError):
    """The journal refused an operation (unknown run or step, a step resolved twice, a second run)."""


class JournalSchemaError(JournalError):
    """The file holds a schema this daemon does not know (newer version, or not a kintsugi journal)."""


@dataclass(frozen=True)
class EventDraft:
    """An event to publish, written in the same transaction as the state change it reports."""

    type: str
    data: dict[str, Any]
    run_id: str | None = None
    topic: str | None = None  # suffix under kintsugi/v1/<instrument_id>/; default f"events/{type}"


@dataclass(frozen=True)
class OutboxEvent:
    seq: int
    topic: str
    type: str
    run_id: str | None
    session: str
    time: float
    data: dict[str, Any]


@dataclass(frozen=True)
class StepRecord:
    """One instrument step. `completed` is when it ended, successfully or not: `error` tells which."""

    id: int
    run_id: str
    slice_index: int
    step: str
    params: dict[str, Any]
    started: float
    completed: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    session: str = ""  # the daemon process that journaled the intent

    @property
    def is_open(self) -> bool:
        """An intent with no outcome: after a crash, the instrument may or may not have done it."""
        return self.completed is None

    @property
    def ok(self) -> bool:
        return self.completed is not None and self.error is None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    recipe: dict[str, Any]
    total_slices: int
    state: str
    created: float
    finished: float | None
    next_slice: int


# Migrations: MIGRATIONS[v] upgrades a file at user_version v to v + 1. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE daemon_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        state TEXT NOT NULL,
        reason TEXT,
        run_id TEXT REFERENCES runs(run_id),
        since REAL NOT NULL,
        session TEXT NOT NULL
    );
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        recipe TEXT NOT NULL,
        total_slices INTEGER NOT NULL CHECK (total_slices >= 0),
        state TEXT NOT NULL,
        created REAL NOT NULL,
        finished REAL,
        next_slice INTEGER NOT NULL DEFAULT 0,
        session TEXT NOT NULL
    );
    CREATE UNIQUE INDEX one_active_run ON runs((1)) WHERE finished IS NULL;
    CREATE TABLE steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        slice_index INTEGER NOT NULL,
        step TEXT NOT NULL,
        params TEXT NOT NULL,
        started REAL NOT NULL,
        completed REAL,
        result TEXT,
        error TEXT,
        session TEXT NOT NULL
    );
    CREATE INDEX steps_by_slice ON steps(run_id, slice_index);
    CREATE INDEX steps_open ON steps(run_id) WHERE completed IS NULL;
    CREATE TABLE checkpoints (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        slice_index INTEGER NOT NULL,
        data TEXT NOT NULL,
        time REAL NOT NULL,
        PRIMARY KEY (run_id, slice_index)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        type TEXT NOT NULL,
        run_id TEXT,
        session TEXT NOT NULL,
        time REAL NOT NULL,
        data TEXT NOT NULL,
        sent REAL
    );
    CREATE INDEX outbox_unsent ON outbox(seq) WHERE sent IS NULL;
    CREATE TABLE commands (
        command_id TEXT PRIMARY KEY,
        verb TEXT NOT NULL,
        reply TEXT NOT NULL,
        time REAL NOT NULL
    );
    """,
)
assert len(MIGRATIONS) == SCHEMA_VERSION


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:  # json's own message ("Out of range float values...") names no field
        raise ValueError(f"journal: {what} holds NaN or Infinity, which JSON cannot carry: {exc}") from None
    except TypeError as exc:
        raise ValueError(f"journal: {what} is not JSON-serialisable: {exc}") from None


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Journal:
    def __init__(self, path: Path, session: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.session = session
        self._clock = clock
        self._depth = 0  # nesting of transaction(); only the outermost one commits
        # isolation_level=None: no implicit transactions; this class issues BEGIN IMMEDIATE itself, so a
        # transaction takes the write lock up front instead of failing to upgrade halfway.
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        try:
            self._configure()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise JournalSchemaError(f"journal {self.path}: not a usable SQLite database ({exc})") from exc
        except BaseException:
            self._conn.close()
            raise

    def _configure(self) -> None:
        c = self._conn
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self.path}: WAL mode unavailable on this filesystem (got {mode})")
        c.execute("PRAGMA synchronous=FULL")  # per connection: fsync the WAL on every commit
        c.execute("PRAGMA foreign_keys=ON")

    def _migrate(self) -> None:
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise JournalSchemaError(
                f"journal {self.path} has schema version {version}, newer than this daemon's "
                f"{SCHEMA_VERSION}: upgrade kintsugi-daemon or point it at another journal file"
            )
        if version == 0:
            tables = self._conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
            if tables[0]:
                raise JournalSchemaError(
                    f"journal {self.path} is an SQLite file without a kintsugi schema version; refusing to "
                    "write into it"
                )
        for v in range(version, SCHEMA_VERSION):
            with self.transaction():
                # executescript would COMMIT our transaction; run the statements one by one instead.
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {v + 1}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit; calls made inside join it, so a caller can group e.g. a state change and a
        command's reply. An exception rolls everything back, events included."""
        if self._depth:
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            failpoints.hit("journal_commit")  # drills: killed inside the transaction, before COMMIT
            with profiling.span("journal"):  # the commit is where the fsyncs are
                self._conn.execute("COMMIT")
        finally:
            self._depth = 0

    def _add_events(self, events: Sequence[EventDraft], now: float) -> None:
        for ev in events:
            self._conn.execute(
                "INSERT INTO outbox (topic, type, run_id, session, time, data) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    ev.topic or f"events/{ev.type}",
                    ev.type,
                    ev.run_id,
                    self.session,
                    now,
                    _dumps(ev.data, f"event {ev.type!r} data"),
                ),
            )

    # --- daemon and runs -------------------------------------------------------------------------

    def create_run(
        self, run_id: str, recipe: dict[str, Any], total_slices: int, events: Sequence[EventDraft] = ()
    ) -> RunRecord:
        now = self._clock()
        recipe_text = _dumps(recipe, f"recipe of run {run_id!r}")
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise JournalError(f"run {run_id!r} already exists in the journal")
            active = self.active_run()
            if active is not None:
                raise JournalError(
                    f"run {active.run_id!r} is still active; finish it before starting another"
                )
            c.execute(
                "INSERT INTO runs (run_id, recipe, total_slices, state, created, session) "
                "VALUES (?, ?, ?, 'created', ?, ?)",
                (run_id, recipe_text, total_slices, now, self.session),
            )
            self._add_events(events, now)
        return RunRecord(run_id, recipe, total_slices, "created", now, None, 0)

    def set_state(
        self, state: str, reason: str | None, run_id: str | None, events: Sequence[EventDraft] = ()
    ) -> None:
        """The daemon's state (one row) and, when `run_id` is given, that run's state, plus events."""
        now = self._clock()
        with self.transaction() as c:
            if run_id is not None and self.run(run_id) is None:
                raise JournalError(f"no run {run_id!r} in the journal")
            c.execute(
                "INSERT INTO daemon_state (id, state, reason, run_id, since, session) "
                "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "reason = excluded.reason, run_id = excluded.run_id, since = excluded.since, "
                "session = excluded.session",
                (state, reason, run_id, now, self.session),
            )
            if run_id is not None:
                # A finished run keeps its final state (done/aborted/stopped); the daemon row still says
                # which run it last worked on.
                c.execute("UPDATE runs SET state = ? WHERE run_id = ? AND finished IS NULL", (state, run_id))
            self._add_events(events, now)

    def daemon_state(self) -> tuple[str, str | None, str | None]:
        row = self._conn.execute("SELECT state, reason, run_id FROM daemon_state WHERE id = 1").fetchone()
        return ("idle", None, None) if row is None else (row[0], row[1], row[2])

    def daemon_state_since(self) -> tuple[float, str] | None:
        """When the current daemon state was entered, and by which session."""
        row = self._conn.execute("SELECT since, session FROM daemon_state WHERE id = 1").fetchone()
        return None if row is None else (float(row[0]), str(row[1]))

    _RUN_COLUMNS = "run_id, recipe, total_slices, state, created, finished, next_slice"

    @staticmethod
    def _run(row: Any) -> RunRecord:
        return RunRecord(row[0], _loads(row[1]), row[2], row[3], row[4], row[5], row[6])

    def run(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        return None if row is None else self._run(row)

    def runs(self) -> list[RunRecord]:
        rows = self._conn.execute(f"SELECT {self._RUN_COLUMNS} FROM runs ORDER BY created, rowid")
        return [self._run(r) for r in rows]

    def active_run(self) -> RunRecord | None:
        row = self._conn.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE finished IS NULL").fetchone()
        return None if row is None else self._run(row)

    def _require_active(self, run_id: str) -> None:
        row = self._conn.execute("SELECT finished FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise JournalError(f"no run {run_id!r} in the journal")
        if row[0] is not None:
            raise JournalError(f"run {run_id!r} is finished; it takes no more steps or state changes")

    def finish_run(self, run_id: str, state: str, events: Sequence[EventDraft] = ()) -> None:
        if state not in FINISHED_RUN_STATES:
            raise ValueError(f"a run finishes as one of {sorted(FINISHED_RUN_STATES)}, not {state!r}")
        now = self._clock()
        with self.transaction() as c:
            self._require_active(run_id)
            c.execute("UPDATE runs SET state = ?, finished = ? WHERE run_id = ?", (state, now, run_id))
            self._add_events(events, now)

    # --- steps and checkpoints -------------------------------------------------------------------

    def begin_step(
        self,
        run_id: str,
        slice_index: int,
        step: str,
        params: dict[str, Any],
        events: Sequence[EventDraft] = (),
    ) -> int:
        """Journal the intent; durable (fsynced) when this returns, before the instrument is touched."""
        now = self._clock()
        params_text = _dumps(params, f"params of step {step!r}")
        with self.transaction() as c:
            self._require_active(run_id)
            cur = c.execute(
                "INSERT INTO steps (run_id, slice_index, step, params, started, session) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, slice_index, step, params_text, now, self.session),
            )
            self._add_events(events, now)
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _resolve_step(
        self, step_id: int, result: str | None, error: str | None, events: Sequence[EventDraft]
    ) -> None:
        now = self._clock()
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE steps SET completed = ?, result = ?, error = ? WHERE id = ? AND completed IS NULL",
                (now, result, error, step_id),
            )
            if cur.rowcount != 1:
                exists = c.execute("SELECT 1 FROM steps WHERE id = ?", (step_id,)).fetchone()
                raise JournalError(
                    f"step {step_id} {'already has an outcome' if exists else 'is not in the journal'}"
                )
            self._add_events(events, now)

    def complete_step(self, step_id: int, result: dict[str, Any], events: Sequence[EventDraft] = ()) -> None:
        self._resolve_step(step_id, _dumps(result, f"result of step {step_id}"), None, events)

    def fail_step(self, step_id: int, error: dict[str, Any], events: Sequence[EventDraft] = ()) -> None:
        self._resolve_step(step_id, None, _dumps(error, f"error of step {step_id}"), events)

    _STEP_COLUMNS = "id, run_id, slice_index, step, params, started, completed, result, error, session"

    @staticmethod
    def _step(r: Any) -> StepRecord:
        return StepRecord(r[0], r[1], r[2], r[3], _loads(r[4]), r[5], r[6], _loads(r[7]), _loads(r[8]), r[9])

    def open_steps(self, run_id: str) -> list[StepRecord]:
        rows = self._conn.execute(
            f"SELECT {self._STEP_COLUMNS} FROM steps WHERE run_id = ? AND completed IS NULL ORDER BY id",
            (run_id,),
        )
        return [self._step(r) for r in rows]

    def steps(self, run_id: str, slice_index: int | None = None) -> list[StepRecord]:
        if slice_index is None:
            rows = self._conn.execute(
                f"SELECT {self._STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY id", (run_id,)
            )
        else:
            rows = self._conn.execute(
                f"SELECT {self._STEP_COLUMNS} FROM steps WHERE run_id = ? AND slice_index = ? ORDER BY id",
                (run_id, slice_index),
            )
        return [self._step(r) for r in rows]

    def checkpoint(
        self, run_id: str, slice_index: int, data: dict[str, Any], events: Sequence[EventDraft] = ()
    ) -> None:
        """Slice `slice_index` is done (files written): the run resumes at slice_index + 1."""
        now = self._clock()
        data_text = _dumps(data, f"checkpoint of slice {slice_index}")
        with self.transaction() as c:
            self._require_active(run_id)
            next_slice = c.execute("SELECT next_slice FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]
            if slice_index < next_slice:
                raise JournalError(
                    f"run {run_id!r}: slice {slice_index} is already checkpointed (next slice {next_slice})"
                )
            c.execute(
                "INSERT INTO checkpoints (run_id, slice_index, data, time) VALUES (?, ?, ?, ?)",
                (run_id, slice_index, data_text, now),
            )
            c.execute("UPDATE runs SET next_slice = ? WHERE run_id = ?", (slice_index + 1, run_id))
            self._add_events(events, now)

    def last_checkpoint(self, run_id: str) -> tuple[int, dict[str, Any]] | None:
        row = self._conn.execute(
            "SELECT slice_index, data FROM checkpoints WHERE run_id = ? ORDER BY slice_index DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return None if row is None else (int(row[0]), _loads(row[1]))

    # --- outbox ----------------------------------------------------------------------------------

    def publish(self, events: Sequence[EventDraft]) -> None:
        """Queue events that report no journaled state change (e.g. a metric-bearing notice)."""
        with self.transaction():
            self._add_events(events, self._clock())

    def pending_events(self, limit: int = 256) -> list[OutboxEvent]:
        rows = self._conn.execute(
            "SELECT seq, topic, type, run_id, session, time, data FROM outbox WHERE sent IS NULL "
            "ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [OutboxEvent(r[0], r[1], r[2], r[3], r[4], r[5], _loads(r[6])) for r in rows]

    def mark_sent(self, seqs: Sequence[int]) -> None:
        now = self._clock()
        with self.transaction() as c:
            c.executemany(
                "UPDATE outbox SET sent = ? WHERE seq = ? AND sent IS NULL", [(now, s) for s in seqs]
            )

    def unsent_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM outbox WHERE sent IS NULL").fetchone()[0])

    def last_seq(self) -> int:
        """The highest seq ever assigned (0 before the first event), pruned rows included."""
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        return 0 if row is None else int(row[0])

    def prune(self, older_than_s: float) -> int:
        """Delete sent events and command replies older than `older_than_s`; unsent events are kept
        whatever their age. AUTOINCREMENT keeps seq from ever going back. Returns rows deleted."""
        cutoff = self._clock() - older_than_s
        with self.transaction() as c:
            n = c.execute("DELETE FROM outbox WHERE sent IS NOT NULL AND sent < ?", (cutoff,)).rowcount
            n += c.execute("DELETE FROM commands WHERE time < ?", (cutoff,)).rowcount
        return n

    # --- commands --------------------------------------------------------------------------------

    def command_reply(self, command_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT reply FROM commands WHERE command_id = ?", (command_id,)).fetchone()
        return None if row is None else dict(_loads(row[0]))

    def record_command(
        self, command_id: str, verb: str, reply: dict[str, Any], events: Sequence[EventDraft] = ()
    ) -> None:
        """Remember the reply so a repeated `command_id` gets the same answer and is not executed twice."""
        now = self._clock()
        reply_text = _dumps(reply, f"reply to command {command_id!r}")
        with self.transaction() as c:
            try:
                c.execute(
                    "INSERT INTO commands (command_id, verb, reply, time) VALUES (?, ?, ?, ?)",
                    (command_id, verb, reply_text, now),
                )
            except sqlite3.IntegrityError:
                raise JournalError(f"command {command_id!r} is already recorded") from None
            self._add_events(events, now)
