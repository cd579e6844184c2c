"""The task database itself: schema, migrations from an older release, WAL, atomic claims."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from sage_ft.tasks import TaskManager, TaskStatus
from sage_ft.tasks.procinfo import current_identity
from sage_ft.tasks.store import SCHEMA_VERSION, Base, SchemaError, TaskRecord, TaskStore, make_engine, migrate
from sage_ft.tasks.worker import LOCAL_RUNS, LOCAL_RUNS_LOCK, claim_next
from tests.fixtures_tasks import tiny_task_config


def _columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_new_database_is_wal_at_current_schema_and_matches_models(task_db):
    store = TaskStore(task_db)
    store.close()
    with sqlite3.connect(task_db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for table in Base.metadata.sorted_tables:  # the models and the migrations describe the same schema
        assert _columns(task_db, table.name) == {c.name for c in table.columns}, table.name


def test_older_database_is_upgraded_and_keeps_its_tasks(task_db):
    engine = make_engine(task_db)
    migrate(engine, target=1)  # what the first release created
    engine.dispose()
    with sqlite3.connect(task_db) as conn:  # a task written by that release, with its columns only
        conn.execute("""INSERT INTO tasks (name, status, source, created_at, updated_at, config_yaml, dataset,
                        output_dir, step, total_steps, last_metrics, position)
                        VALUES ('old run', 'completed', 'cli', 1.0, 2.0, 'max_steps: 4\n', '/d.jsonl', '/runs/old',
                        4, 4, '{"loss": 1.5}', 1)""")
    assert "cancel_requested" not in _columns(task_db, "tasks")

    manager = TaskManager(task_db, start_worker=False)
    try:
        [task] = manager.list()
        assert (task.name, task.status, task.last_metrics, task.attempts) == ("old run", TaskStatus.COMPLETED,
                                                                             {"loss": 1.5}, 1)
        assert task.cancel_requested is False and task.parent_id is None
        assert manager.store.integrity_check() == "ok"
    finally:
        manager.shutdown()
    with sqlite3.connect(task_db) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == \
            list(range(1, SCHEMA_VERSION + 1))


def test_tasks_of_an_older_database_keep_their_duration(task_db):
    """Schema 4 counts the time trained (pauses and gaps between attempts left out); a finished
    task of an older database keeps the duration it showed (finished - started)."""
    engine = make_engine(task_db)
    migrate(engine, target=3)
    engine.dispose()
    with sqlite3.connect(task_db) as conn:
        conn.execute("""INSERT INTO tasks (name, status, source, created_at, started_at, finished_at, updated_at,
                        config_yaml, output_dir, position) VALUES ('old', 'completed', 'ui', 1.0, 10.0, 70.5, 70.5,
                        'max_steps: 4\n', '/runs/old', 1)""")
    manager = TaskManager(task_db, start_worker=False)
    try:
        assert manager.list()[0].duration_s == 60.5
    finally:
        manager.shutdown()


def test_newer_database_is_refused_with_a_clear_message(task_db):
    TaskStore(task_db).close()
    with sqlite3.connect(task_db) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 5,))
    with pytest.raises(SchemaError, match=rf"version {SCHEMA_VERSION + 5} is newer .* upgrade sage-ft"):
        TaskManager(task_db, start_worker=False)


def test_foreign_sqlite_file_is_refused(task_db):
    with sqlite3.connect(task_db) as conn:
        conn.execute("CREATE TABLE tasks (x INTEGER)")
    with pytest.raises(SchemaError, match="not a sage-ft database"):
        TaskStore(task_db)


def test_concurrent_claims_never_take_one_task_twice(task_db, task_dataset):
    """8 threads, each with its own connection pool, race to claim 12 queued tasks."""
    manager = TaskManager(task_db, start_worker=False)
    ids = [manager.create(tiny_task_config(task_dataset), name=f"t{i}").id for i in range(12)]
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer() -> None:
        store = TaskStore(task_db)
        start.wait()
        while (task_id := claim_next(store, current_identity(), max_running=100)) is not None:
            with lock:
                claimed.append(task_id)
        store.close()

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert sorted(claimed) == ids  # every task claimed exactly once
        assert {t.status for t in manager.list()} == {TaskStatus.RUNNING}
    finally:
        with LOCAL_RUNS_LOCK:
            LOCAL_RUNS.difference_update(ids)
        manager.shutdown()


def test_claim_respects_queue_order_and_the_running_limit(idle_manager, task_dataset):
    first = idle_manager.create(tiny_task_config(task_dataset), name="first")
    second = idle_manager.create(tiny_task_config(task_dataset), name="second")
    me = current_identity()
    try:
        assert claim_next(idle_manager.store, me) == first.id
        assert claim_next(idle_manager.store, me) is None  # one run at a time
        assert claim_next(idle_manager.store, me, max_running=2) == second.id
        with idle_manager.store.read() as s:
            rows = s.scalars(select(TaskRecord).order_by(TaskRecord.id)).all()
        assert [(r.pid, r.status) for r in rows] == [(me.pid, "running")] * 2
        assert all(r.started_at and r.started_at <= time.time() for r in rows)
    finally:
        with LOCAL_RUNS_LOCK:
            LOCAL_RUNS.difference_update({first.id, second.id})


def test_status_icons():
    assert {s.value: s.icon for s in TaskStatus} == {
        "queued": "⏳", "running": "🔄", "completed": "✅", "failed": "❌", "cancelled": "⏹", "interrupted": "⚠️"}
    assert TaskStatus.RUNNING.label == "🔄 running"
    assert not TaskStatus.RUNNING.is_final and TaskStatus.INTERRUPTED.is_resumable
    assert not TaskStatus.COMPLETED.is_resumable
