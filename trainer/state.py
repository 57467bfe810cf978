"""The trainer's state on disk: files, jobs, events and checkpoints in one SQLite database.

`TRAINER_DATA_DIR/trainer.sqlite3`, WAL mode, explicit SQL, numbered append-only migrations.
All access goes through one worker thread, so the event loop never waits on the disk and
the connection is never shared between threads. Status changes are conditional updates
(`... WHERE status IN (...)`): when a cancel and a finishing worker race, exactly one wins.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"validating_files", "queued", "running"})

# Append-only: a shipped migration is never edited; a change is a new entry.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            filename TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            purpose TEXT NOT NULL,
            created_at INTEGER NOT NULL
        );
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            created_at INTEGER NOT NULL,
            model TEXT NOT NULL,
            training_file TEXT NOT NULL,
            validation_file TEXT,
            status TEXT NOT NULL,
            hyperparameters TEXT NOT NULL,
            suffix TEXT,
            seed INTEGER NOT NULL,
            metadata TEXT,
            model_name TEXT NOT NULL,
            fine_tuned_model TEXT,
            error TEXT,
            finished_at INTEGER,
            trained_tokens INTEGER,
            estimated_finish INTEGER,
            adapter_path TEXT,
            slot TEXT,
            pid INTEGER,
            started_at INTEGER,
            examples INTEGER,
            tokens INTEGER,
            train_seconds REAL,
            tokens_per_second REAL,
            peak_memory_bytes INTEGER,
            resumes INTEGER NOT NULL DEFAULT 0,
            resume_from TEXT
        );
        CREATE INDEX jobs_by_status ON jobs (status, seq);
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES jobs (id),
            created_at INTEGER NOT NULL,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            type TEXT NOT NULL,
            data TEXT
        );
        CREATE INDEX events_by_job ON events (job_id, seq);
        CREATE TABLE checkpoints (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL REFERENCES jobs (id),
            created_at INTEGER NOT NULL,
            step INTEGER NOT NULL,
            name TEXT NOT NULL,
            path TEXT NOT NULL,
            metrics TEXT NOT NULL
        );
        CREATE INDEX checkpoints_by_job ON checkpoints (job_id, seq);
        """,
    ),
]

# Job columns the scheduler may set; anything else is a programming error.
_JOB_COLUMNS = frozenset(
    {
        "status",
        "hyperparameters",
        "fine_tuned_model",
        "error",
        "finished_at",
        "trained_tokens",
        "estimated_finish",
        "adapter_path",
        "slot",
        "pid",
        "started_at",
        "examples",
        "tokens",
        "train_seconds",
        "tokens_per_second",
        "peak_memory_bytes",
        "resumes",
        "resume_from",
    }
)
_JSON_COLUMNS = frozenset({"hyperparameters", "error", "metadata"})


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    created_at: int
    model: str
    training_file: str
    validation_file: str | None
    status: str
    hyperparameters: dict[str, Any]
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    model_name: str  # the name it is served under once it succeeds
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    adapter_path: str | None = None
    slot: str | None = None
    pid: int | None = None
    started_at: int | None = None
    examples: int | None = None
    tokens: int | None = None
    train_seconds: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    resumes: int = 0  # times it was interrupted and put back in the queue
    resume_from: str | None = None  # the checkpoint it resumes from

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    job_id: str
    created_at: int
    level: str
    message: str
    type: str = "message"
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    id: str
    job_id: str
    created_at: int
    step: int
    name: str
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to record, e.g. alongside a status change."""

    message: str
    level: str = "info"
    type: str = "message"
    data: Mapping[str, Any] | None = None


def _row_job(row: sqlite3.Row) -> Job:
    values = {k: row[k] for k in row.keys() if k != "seq"}
    for key in _JSON_COLUMNS:
        if values.get(key) is not None:
            values[key] = json.loads(values[key])
    return Job(**values)


def _row_event(row: sqlite3.Row) -> Event:
    data = json.loads(row["data"]) if row["data"] is not None else None
    return Event(
        row["id"], row["job_id"], row["created_at"], row["level"], row["message"], row["type"], data
    )


def _row_checkpoint(row: sqlite3.Row) -> Checkpoint:
    return Checkpoint(
        row["id"],
        row["job_id"],
        row["created_at"],
        row["step"],
        row["name"],
        row["path"],
        json.loads(row["metrics"]),
    )


def _encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in _JSON_COLUMNS and value is not None else value


class Store:
    """The database, reached from the event loop through one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-db")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle --------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self._conn = conn
        migrate(conn)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=False)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "Store.open() first"
        return self._conn

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # -- files ------------------------------------------------------------------------------

    async def add_file(self, record: FileRecord) -> None:
        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO files (id, filename, bytes, purpose, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (record.id, record.filename, record.bytes, record.purpose, record.created_at),
            )

        await self._run(self._tx, add)

    async def get_file(self, file_id: str) -> FileRecord | None:
        def get() -> FileRecord | None:
            row = self.conn.execute(
                "SELECT id, filename, bytes, purpose, created_at FROM files WHERE id = ?",
                (file_id,),
            ).fetchone()
            return FileRecord(*row) if row else None

        return await self._run(get)

    async def delete_file(self, file_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

        return await self._run(self._tx, delete)

    # -- jobs -------------------------------------------------------------------------------

    async def create_job(self, job: Job, events: Iterable[NewEvent] = ()) -> None:
        events = list(events)

        def create(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO jobs (id, created_at, model, training_file, validation_file, status,"
                " hyperparameters, suffix, seed, metadata, model_name)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.created_at,
                    job.model,
                    job.training_file,
                    job.validation_file,
                    job.status,
                    json.dumps(job.hyperparameters),
                    job.suffix,
                    job.seed,
                    json.dumps(job.metadata) if job.metadata is not None else None,
                    job.model_name,
                ),
            )
            for event in events:
                _insert_event(conn, job.id, event)

        await self._run(self._tx, create)

    async def get_job(self, job_id: str) -> Job | None:
        def get() -> Job | None:
            row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _row_job(row) if row else None

        return await self._run(get)

    async def list_jobs(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; `after` is the last id of the previous page. (jobs, has_more)."""

        def page() -> tuple[list[Job], bool]:
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE (? IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?))"
                " ORDER BY seq DESC LIMIT ?",
                (after, after, limit + 1),
            ).fetchall()
            return [_row_job(r) for r in rows[:limit]], len(rows) > limit

        return await self._run(page)

    async def jobs_with_status(self, *statuses: str) -> list[Job]:
        """Jobs in any of `statuses`, oldest first (the order they run in)."""

        def select() -> list[Job]:
            marks = ",".join("?" * len(statuses))
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
            return [_row_job(r) for r in rows]

        return await self._run(select)

    async def transition(
        self,
        job_id: str,
        from_statuses: Iterable[str],
        to_status: str,
        *,
        events: Iterable[NewEvent] = (),
        **values: Any,
    ) -> bool:
        """Move a job to `to_status` if it is in one of `from_statuses`; False if it was not.

        `values` (job columns) and `events` are written in the same transaction.
        """
        sources = list(from_statuses)
        events = list(events)
        assignments = {"status": to_status, **values}
        _check_columns(assignments)

        def move(conn: sqlite3.Connection) -> bool:
            sets = ", ".join(f"{column} = ?" for column in assignments)
            marks = ",".join("?" * len(sources))
            cursor = conn.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({marks})",
                [_encode(c, v) for c, v in assignments.items()] + [job_id, *sources],
            )
            if cursor.rowcount == 0:
                return False
            for event in events:
                _insert_event(conn, job_id, event)
            return True

        return await self._run(self._tx, move)

    async def update_job(self, job_id: str, events: Iterable[NewEvent] = (), **values: Any) -> None:
        """Set job columns (and record events) whatever the job's status."""
        events = list(events)
        _check_columns(values)

        def update(conn: sqlite3.Connection) -> None:
            if values:
                sets = ", ".join(f"{column} = ?" for column in values)
                conn.execute(
                    f"UPDATE jobs SET {sets} WHERE id = ?",
                    [_encode(c, v) for c, v in values.items()] + [job_id],
                )
            for event in events:
                _insert_event(conn, job_id, event)

        await self._run(self._tx, update)

    async def fine_tuned_models(self) -> list[Job]:
        """Succeeded jobs (their `fine_tuned_model`s), oldest first."""
        return await self.jobs_with_status("succeeded")

    # -- events and checkpoints -------------------------------------------------------------

    async def add_event(self, job_id: str, event: NewEvent) -> None:
        await self.update_job(job_id, [event])

    async def list_events(
        self, job_id: str, limit: int, after: str | None = None
    ) -> tuple[list[Event], bool]:
        """Newest first, as OpenAI lists them; `after` is the last id of the previous page."""

        def page() -> tuple[list[Event], bool]:
            rows = self.conn.execute(
                "SELECT * FROM events WHERE job_id = ?"
                " AND (? IS NULL OR seq < (SELECT seq FROM events WHERE id = ?))"
                " ORDER BY seq DESC LIMIT ?",
                (job_id, after, after, limit + 1),
            ).fetchall()
            return [_row_event(r) for r in rows[:limit]], len(rows) > limit

        return await self._run(page)

    async def add_checkpoint(self, checkpoint: Checkpoint, event: NewEvent | None = None) -> None:
        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step, name, path, metrics)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    checkpoint.id,
                    checkpoint.job_id,
                    checkpoint.created_at,
                    checkpoint.step,
                    checkpoint.name,
                    checkpoint.path,
                    json.dumps(checkpoint.metrics),
                ),
            )
            if event is not None:
                _insert_event(conn, checkpoint.job_id, event)

        await self._run(self._tx, add)

    async def list_checkpoints(
        self, job_id: str, limit: int, after: str | None = None
    ) -> tuple[list[Checkpoint], bool]:
        """Newest first; `after` is the last id of the previous page."""

        def page() -> tuple[list[Checkpoint], bool]:
            rows = self.conn.execute(
                "SELECT * FROM checkpoints WHERE job_id = ?"
                " AND (? IS NULL OR seq < (SELECT seq FROM checkpoints WHERE id = ?))"
                " ORDER BY seq DESC LIMIT ?",
                (job_id, after, after, limit + 1),
            ).fetchall()
            return [_row_checkpoint(r) for r in rows[:limit]], len(rows) > limit

        return await self._run(page)

    async def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        checkpoints, _ = await self.list_checkpoints(job_id, 1)
        return checkpoints[0] if checkpoints else None


def _check_columns(values: Mapping[str, Any]) -> None:
    unknown = set(values) - _JOB_COLUMNS
    if unknown:
        raise ValueError(f"not a settable job column: {sorted(unknown)}")


def _insert_event(conn: sqlite3.Connection, job_id: str, event: NewEvent) -> None:
    conn.execute(
        "INSERT INTO events (id, job_id, created_at, level, message, type, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            new_id("ftevent"),
            job_id,
            now(),
            event.level,
            event.message,
            event.type,
            json.dumps(dict(event.data)) if event.data is not None else None,
        ),
    )


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction; their numbers."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in (s.strip() for s in sql.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, now()),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(version)
    return applied
