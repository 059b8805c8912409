"""The journal: atomic state + events, gap-free seq, crash survival of step intents, schema guard."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kintsugi_daemon.service.journal import (
    SCHEMA_VERSION,
    EventDraft,
    Journal,
    JournalError,
    JournalSchemaError,
)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite", session="s1") as j:
        yield j


def ev(type_: str, **data: object) -> EventDraft:
    return EventDraft(type_, dict(data), run_id="r1")


def test_new_file_is_idle_and_pragmas_are_set(journal: Journal) -> None:
    assert journal.daemon_state() == ("idle", None, None)
    assert journal.active_run() is None
    assert journal.pending_events() == []
    # What a second connection sees is the file's real state, not what we asked for.
    with sqlite3.connect(journal.path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn = journal._conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_run_lifecycle(journal: Journal) -> None:
    run = journal.create_run("r1", {"slices": 3}, 3, [ev("run_started", total=3)])
    assert run.state == "created" and run.next_slice == 0
    with pytest.raises(JournalError, match="still active"):
        journal.create_run("r2", {}, 1)
    with pytest.raises(JournalError, match="already exists"):
        journal.create_run("r1", {}, 1)
    journal.set_state("running", None, "r1", [ev("state", state="running")])
    assert journal.daemon_state() == ("running", None, "r1")
    active = journal.active_run()
    assert active is not None and active.state == "running" and active.recipe == {"slices": 3}

    journal.checkpoint("r1", 0, {"face_m": 4e-8}, [ev("slice_completed", index=0)])
    journal.checkpoint("r1", 1, {"face_m": 8e-8})
    with pytest.raises(JournalError, match="already checkpointed"):
        journal.checkpoint("r1", 1, {})
    assert journal.last_checkpoint("r1") == (1, {"face_m": 8e-8})
    run_now = journal.run("r1")
    assert run_now is not None and run_now.next_slice == 2

    journal.finish_run("r1", "done", [ev("run_finished", state="done")])
    assert journal.active_run() is None
    with pytest.raises(JournalError, match="finished"):
        journal.begin_step("r1", 2, "mill", {})
    with pytest.raises(ValueError, match="finishes as one of"):
        journal.finish_run("r1", "running")
    # The daemon row may keep pointing at a finished run; the run keeps its final state.
    journal.set_state("done", None, "r1")
    final = journal.run("r1")
    assert final is not None and final.state == "done" and final.finished is not None
    journal.create_run("r2", {}, 1)  # a new run once the previous one is finished
    types = [e.type for e in journal.pending_events()]
    assert types == ["run_started", "state", "slice_completed", "run_finished"]


def test_step_intent_and_outcome(journal: Journal) -> None:
    journal.create_run("r1", {}, 2)
    a = journal.begin_step("r1", 0, "mill", {"depth_m": 4e-8}, [ev("step_started", step="mill")])
    b = journal.begin_step("r1", 0, "polish", {"current_a": 1e-9})
    assert [s.id for s in journal.open_steps("r1")] == [a, b]
    journal.complete_step(a, {"removed_m": 3.9e-8}, [ev("step_completed", step="mill")])
    journal.fail_step(b, {"kind": "InstrumentFault", "message": "beam blanked"})
    assert journal.open_steps("r1") == []
    with pytest.raises(JournalError, match="already has an outcome"):
        journal.complete_step(a, {})
    with pytest.raises(JournalError, match="not in the journal"):
        journal.fail_step(999, {})
    mill, polish = journal.steps("r1", slice_index=0)
    assert mill.ok and mill.result == {"removed_m": 3.9e-8} and mill.params == {"depth_m": 4e-8}
    assert not polish.ok and not polish.is_open and polish.error is not None
    assert journal.steps("r1", slice_index=1) == []
    with pytest.raises(JournalError, match="no run"):
        journal.begin_step("nope", 0, "mill", {})
    with pytest.raises(JournalError, match="no run"):
        journal.set_state("running", None, "nope")


def test_exception_in_transaction_leaves_neither_state_nor_event(journal: Journal) -> None:
    journal.create_run("r1", {}, 2)
    journal.set_state("running", None, "r1")
    before = journal.unsent_count()

    def pause_then_fail() -> None:
        with journal.transaction():
            journal.set_state("paused", "operator", "r1", [ev("paused")])
            journal.begin_step("r1", 0, "mill", {})
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pause_then_fail()
    assert journal.daemon_state() == ("running", None, "r1")
    assert journal.open_steps("r1") == []
    assert journal.unsent_count() == before
    # A failure inside one call (the event cannot be serialised after the state row was updated).
    with pytest.raises(ValueError, match="NaN"):
        journal.set_state("paused", "x", "r1", [ev("paused", value=math.nan)])
    assert journal.daemon_state() == ("running", None, "r1")
    assert journal.unsent_count() == before
    # The next event still gets the next seq: a rollback does not burn numbers.
    journal.publish([ev("note")])
    assert [e.seq for e in journal.pending_events()] == list(range(1, before + 2))


def test_nan_refused_everywhere(journal: Journal) -> None:
    with pytest.raises(ValueError, match="recipe of run 'r1' holds NaN"):
        journal.create_run("r1", {"thickness_m": math.inf}, 1)
    journal.create_run("r1", {}, 1)
    with pytest.raises(ValueError, match="params of step 'mill'"):
        journal.begin_step("r1", 0, "mill", {"depth_m": math.nan})
    step = journal.begin_step("r1", 0, "mill", {})
    with pytest.raises(ValueError, match="result of step"):
        journal.complete_step(step, {"x": -math.inf})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        journal.complete_step(step, {"x": object()})
    assert journal.open_steps("r1")[0].id == step  # still open: nothing half-written


def test_seq_gap_free_across_reopen_and_sessions(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path, "s1") as j:
        j.create_run("r1", {}, 5, [ev("run_started")])
        j.publish([ev("a"), ev("b")])
        j.mark_sent([1, 2])
    with Journal(path, "s2") as j:
        assert [(e.seq, e.type, e.session) for e in j.pending_events()] == [(3, "b", "s1")]
        j.publish([ev("c")])
        j.mark_sent([3, 4])
        assert j.unsent_count() == 0
        # Pruning every sent event must not let seq restart.
        assert j.prune(older_than_s=-1) == 4
        assert j.last_seq() == 4
    with Journal(path, "s3") as j:
        j.publish([ev("d"), ev("e")])
        pending = j.pending_events()
        assert [(e.seq, e.session) for e in pending] == [(5, "s3"), (6, "s3")]
        assert pending[0].topic == "events/d" and pending[0].run_id == "r1"
        assert j.pending_events(limit=1) == pending[:1]


def test_custom_topic_and_outbox_order(journal: Journal) -> None:
    journal.publish([EventDraft("progress", {"slice": 1}, topic="progress"), EventDraft("x", {})])
    first, second = journal.pending_events()
    assert (first.topic, second.topic) == ("progress", "events/x")
    assert first.seq + 1 == second.seq and first.run_id is None


_CRASH_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from kintsugi_daemon.service.journal import Journal
    j = Journal(Path(sys.argv[1]), "crashing")
    j.create_run("r1", {}, 10)
    j.checkpoint("r1", 0, {})
    done = j.begin_step("r1", 1, "deposit_pt", {"thickness_m": 1e-7})
    j.complete_step(done, {"ok": True})
    j.begin_step("r1", 1, "mill", {"depth_m": 4e-8})
    print("intent journaled", flush=True)
    time.sleep(60)
    """
)


def test_open_intent_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-c", _CRASH_CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "intent journaled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with Journal(path, "recovering") as j:
        run = j.active_run()
        assert run is not None and run.next_slice == 1
        (open_step,) = j.open_steps("r1")
        assert (open_step.step, open_step.slice_index, open_step.session) == ("mill", 1, "crashing")
        assert open_step.params == {"depth_m": 4e-8}
        assert [s.step for s in j.steps("r1", 1) if s.ok] == ["deposit_pt"]


def test_concurrent_reader_sees_committed_data(journal: Journal) -> None:
    reader = sqlite3.connect(journal.path)
    try:
        journal.create_run("r1", {}, 1, [ev("run_started")])
        assert reader.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
        with journal.transaction():
            journal.publish([ev("uncommitted")])
            # Readers are not blocked by the open write transaction, and do not see it.
            assert reader.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1
        assert reader.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2
        with Journal(journal.path, "reader") as second:
            assert second.unsent_count() == 2
            active = second.active_run()
            assert active is not None and active.run_id == "r1"
    finally:
        reader.close()


def test_command_dedup(journal: Journal) -> None:
    assert journal.command_reply("c1") is None
    journal.record_command("c1", "pause", {"ok": True, "state": "pausing"}, [ev("paused")])
    assert journal.command_reply("c1") == {"ok": True, "state": "pausing"}
    with pytest.raises(JournalError, match="already recorded"):
        journal.record_command("c1", "pause", {"ok": False})
    assert journal.command_reply("c1") == {"ok": True, "state": "pausing"}
    assert journal.unsent_count() == 1


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path, "s").close()
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalSchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Journal(path, "s")


def test_foreign_sqlite_file_and_garbage_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(JournalSchemaError, match="without a kintsugi schema version"):
        Journal(foreign, "s")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalSchemaError, match="not a usable SQLite database"):
        Journal(garbage, "s")
