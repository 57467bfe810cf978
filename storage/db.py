"""The SQLite store: opening, migrating and closing the database, and its parts by concern.

WAL mode, foreign keys on. Reads run on one aiosqlite connection; every write is a plain
function of a `sqlite3.Connection` run by `storage.writer.Writer` (see there for why). Each
concern (threads and turns, the inbox, jobs, stats, settings, /forget, evaluations) is a
class of its own module over those two, reached as an attribute: `store.jobs.add(...)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import aiosqlite

from bot.domain import DatabaseState, utcnow
from storage.base import Part
from storage.dataset import DatasetSource
from storage.evals import EvalStore
from storage.forget import ForgetStore
from storage.inbox import InboxStore
from storage.jobs import JobStore
from storage.migrations import MIGRATIONS, Migration
from storage.settings import SettingsStore
from storage.stats import StatsStore
from storage.threads import ThreadStore
from storage.writer import Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

# What the database raises when it cannot be opened or read (beside OSError).
DatabaseError = sqlite3.Error


class Store(Part):
    """Async repository over the SQLite dialogue log: the database, and its parts."""

    def __init__(self, conn: aiosqlite.Connection, writer: Writer, path: Path) -> None:
        super().__init__(conn, writer)
        self.dataset = DatasetSource(path)
        self.threads = ThreadStore(conn, writer)
        self.inbox = InboxStore(conn, writer)
        self.jobs = JobStore(conn, writer)
        self.stats = StatsStore(conn, writer)
        self.settings = SettingsStore(conn, writer)
        self.forget = ForgetStore(conn, writer)
        self.evals = EvalStore(conn, writer, self.jobs)

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        """Open (creating if needed) the database at `path` and apply pending migrations."""
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("the store needs a database file: its reader and writer share it")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA secure_delete=ON")  # migrations write here too
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            store = cls(conn, Writer(path), path)
        except BaseException:
            await conn.close()
            raise
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Carry out the writes asked for, then close both connections."""
        await self._writer.close()
        await self._conn.close()

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` (plain sqlite3 calls) as one transaction of the writer's; its result."""
        return await self._write(work)

    # -- migrations -------------------------------------------------------------------------

    async def schema_version(self) -> int:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        async with self._conn.execute("SELECT MAX(version) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def migrate(self, migrations: Iterable[Migration] = MIGRATIONS) -> int:
        """Apply every migration newer than the schema, each in its own transaction."""
        current = await self.schema_version()
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version <= current:
                continue
            log.info("applying migration %04d %s", migration.version, migration.name)
            # executescript runs statement by statement; wrap it so a failure leaves nothing.
            script = (
                "BEGIN IMMEDIATE;\n"
                + migration.sql
                + "\nINSERT INTO schema_migrations (version, name, applied_at) VALUES ("
                + f"{int(migration.version)}, '{migration.name.replace(chr(39), '')}', "
                + f"'{utcnow()}');\nCOMMIT;"
            )
            try:
                await self._conn.executescript(script)
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
            current = migration.version
        return current

    # -- the database as a whole -----------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False while storage fails (disk full...): new updates can't be taken in."""
        return self._writer.healthy

    async def checkpoint(self, attempts: int = 3) -> bool:
        """Move the write-ahead log into the database file and truncate it; True if done.

        After /forget: the WAL still holds earlier images of the pages the deleted words
        were on (a checkpoint copies only the latest, zeroed by secure_delete). Runs on a
        connection of its own in a thread; readers in the middle of a query can hold it up,
        so it is tried a few times.
        """
        path = await self._file()
        for attempt in range(attempts):
            if await asyncio.to_thread(_checkpoint, path):
                return True
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2)
        return False

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Run a read query (used by tests); explicit SQL, parameterised."""
        return await self._fetch_all(sql, params)


def _checkpoint(path: str) -> bool:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        busy, _log, _moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return busy == 0


def inspect(path: Path) -> DatabaseState:
    """Look at the database file without creating or changing it: its schema, or whether the
    bot could create it (`python -m bot check`)."""
    latest = max(m.version for m in MIGRATIONS)
    if not path.exists():
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            return DatabaseState(False, latest=latest, problem="cannot_create", detail=str(folder))
        return DatabaseState(False, latest=latest)
    if not path.is_file():
        return DatabaseState(True, latest=latest, problem="not_a_file")
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
        return DatabaseState(True, latest=latest, problem="not_writable")
    # Read-only; with no write-ahead log beside it (the bot is not running and closed it
    # cleanly) as an immutable file, or SQLite would leave a new -wal and -shm behind.
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.resolve().as_uri()}?{'mode=ro' if wal else 'immutable=1'}"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            version = 0
            if "schema_migrations" in tables:
                row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
                version = int(row[0] or 0)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return DatabaseState(True, latest=latest, problem="unreadable", detail=str(exc))
    if tables and not version:
        return DatabaseState(True, latest=latest, problem="foreign")
    if version > latest:
        return DatabaseState(True, version, latest, problem="newer")
    return DatabaseState(True, version, latest)
