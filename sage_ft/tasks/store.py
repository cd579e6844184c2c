"""The task database: SQLAlchemy 2 models over one SQLite file (WAL), with a versioned schema.

Why these choices:
- WAL + ``busy_timeout`` let the web UI, the CLI and test processes read while one writes.
- Every write transaction starts with ``BEGIN IMMEDIATE``: a writer takes the lock up front and waits
  for it (busy_timeout) instead of failing half-way when two processes upgrade read locks at once.
  Reads use a plain deferred ``BEGIN`` and never block anyone.
- The schema is created and upgraded only by the numbered migrations below, each frozen once
  released (literal SQL, not derived from the models), and recorded in ``schema_version``. A newer
  sage-ft opens an older database by applying the missing steps; an older sage-ft refuses a newer
  database with a clear message instead of corrupting it. ``tests/test_tasks_store.py`` checks the
  models match the migrated schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sage_ft import paths

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


class SchemaError(RuntimeError):
    """The database cannot be used by this release (newer schema, or not a sage-ft database)."""


class StoreUnavailable(paths.DataHomeUnavailable):
    """The task database cannot be created or opened (data home not writable, disk full, a file in
    the way); the message names the path and what to do."""


class Base(DeclarativeBase):
    pass


class TaskRecord(Base):
    """One fine-tuning task. ``config_yaml`` is written once at creation and never changed."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str]
    status: Mapped[str]
    source: Mapped[str] = mapped_column(default="ui")
    created_at: Mapped[float]
    started_at: Mapped[float | None]
    finished_at: Mapped[float | None]
    updated_at: Mapped[float]
    config_yaml: Mapped[str]
    dataset: Mapped[str] = mapped_column(default="")
    dataset_fingerprint: Mapped[str] = mapped_column(default="")
    output_dir: Mapped[str]
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    last_metrics: Mapped[str] = mapped_column(default="{}")
    error: Mapped[str | None]
    pid: Mapped[int | None]
    pid_start_time: Mapped[float | None]
    resume_checkpoint: Mapped[str | None]
    position: Mapped[int] = mapped_column(default=0)
    # schema 2
    child_pid: Mapped[int | None]
    child_start_time: Mapped[float | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    parent_id: Mapped[int | None]
    attempts: Mapped[int] = mapped_column(default=1)
    # schema 3
    paused: Mapped[bool] = mapped_column(default=False)
    # schema 4
    active_seconds: Mapped[float] = mapped_column(default=0.0)  # time trained so far, pauses left out
    active_since: Mapped[float | None]  # start of the stretch now counting (running, not paused)


class WorkerRecord(Base):
    """A live queue worker (heartbeat), so clients can tell whether queued tasks will start."""

    __tablename__ = "workers"

    pid: Mapped[int] = mapped_column(primary_key=True)
    start_time: Mapped[float] = mapped_column(primary_key=True)
    started_at: Mapped[float]
    heartbeat_at: Mapped[float]
    current_task_id: Mapped[int | None]


# ---------------------------------------------------------------------------------------- migrations
def _v1_initial(conn: Connection) -> None:
    conn.exec_driver_sql("""
        CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT 'ui',
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            updated_at REAL NOT NULL,
            config_yaml TEXT NOT NULL,
            dataset TEXT NOT NULL DEFAULT '',
            dataset_fingerprint TEXT NOT NULL DEFAULT '',
            output_dir TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            total_steps INTEGER NOT NULL DEFAULT 0,
            last_metrics TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER,
            pid_start_time REAL,
            resume_checkpoint TEXT,
            position INTEGER NOT NULL DEFAULT 0
        )""")
    conn.exec_driver_sql("CREATE INDEX ix_tasks_status_position ON tasks (status, position)")


def _v2_children_cancel_workers(conn: Connection) -> None:
    """Worker child processes, cross-process cancel requests, task lineage, worker heartbeats."""
    for ddl in ("child_pid INTEGER", "child_start_time REAL", "cancel_requested BOOLEAN NOT NULL DEFAULT 0",
                "parent_id INTEGER", "attempts INTEGER NOT NULL DEFAULT 1"):
        conn.exec_driver_sql(f"ALTER TABLE tasks ADD COLUMN {ddl}")
    conn.exec_driver_sql("""
        CREATE TABLE workers (
            pid INTEGER NOT NULL,
            start_time REAL NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            current_task_id INTEGER,
            PRIMARY KEY (pid, start_time)
        )""")


def _v3_pause(conn: Connection) -> None:
    """Pause/unpause of a running task from any process (a flag its running process obeys)."""
    conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN paused BOOLEAN NOT NULL DEFAULT 0")


def _v4_active_time(conn: Connection) -> None:
    """Time actually trained (attempts summed, pauses and the wait between attempts left out), so a
    resumed task keeps its first start and its duration and throughput stay true."""
    conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN active_seconds REAL NOT NULL DEFAULT 0")
    conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN active_since REAL")
    conn.exec_driver_sql("UPDATE tasks SET active_seconds = max(0, finished_at - started_at) "
                         "WHERE started_at IS NOT NULL AND finished_at IS NOT NULL")
    conn.exec_driver_sql("UPDATE tasks SET active_since = started_at WHERE status = 'running' AND paused = 0")


# Append only; never edit a released step.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1_initial, _v2_children_cancel_workers, _v3_pause,
                                                  _v4_active_time]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: Connection) -> int:
    """The version recorded in the database (0 for an empty file)."""
    has_table = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'").first()
    if not has_table:
        if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tasks'").first():
            raise SchemaError("the database has a tasks table but no schema_version: not a sage-ft database")
        return 0
    row = conn.exec_driver_sql("SELECT max(version) FROM schema_version").first()
    return int(row[0] or 0)


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to ``target`` (default: this release's schema); returns the version before.

    Runs in one ``BEGIN IMMEDIATE`` transaction, so two processes opening a new file at the same
    time cannot both apply a step, and a failed step leaves the file as it was.
    """
    with engine.begin() as conn:
        before = schema_version(conn)
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"{engine.url.database}: task database schema version {before} is newer than this "
                f"sage-ft supports ({SCHEMA_VERSION}); upgrade sage-ft or use another SAGE_FT_HOME")
        if before == 0:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at REAL)")
        for version in range(before + 1, target + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
                         {"v": version, "t": time.time()})
            log.info("task database migrated to schema %d", version)
    return before


# ---------------------------------------------------------------------------------------- the store
def make_engine(path: Path) -> Engine:
    """An engine whose connections use WAL, a busy timeout, and explicit BEGIN [IMMEDIATE]."""
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False,
                                                              "timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # the driver stays out of transactions; we BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("sage_read_only") else "BEGIN IMMEDIATE")

    return engine


class TaskStore:
    """The open task database. ``read()`` / ``write()`` give ORM sessions in the right transaction."""

    def __init__(self, path: str | Path | None = None):
        try:
            self.path = Path(path) if path else paths.database_path()
            paths.make_folder(self.path.parent)
        except paths.DataHomeUnavailable as exc:
            raise StoreUnavailable(f"the task database cannot be created: {exc}") from None
        self.engine = make_engine(self.path)
        self._read_engine = self.engine.execution_options(sage_read_only=True)
        try:
            migrate(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise StoreUnavailable(f"cannot open the task database {self.path}: {exc.orig}; check that the folder "
                                   "is writable and the disk not full, or set SAGE_FT_HOME elsewhere") from None
        except Exception:
            self.engine.dispose()
            raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        with Session(self._read_engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed on success and rolled back on error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def integrity_check(self) -> str:
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())

    def close(self) -> None:
        self.engine.dispose()
