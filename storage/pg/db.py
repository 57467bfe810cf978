"""The PostgreSQL store: opening (pool, migrations under a lock), closing, and its parts.

`DATABASE_URL=postgresql://user@host:5432/db` selects it (bot/settings.py). Parts mirror the
SQLite store's, method for method (storage/interface.py names what both offer); the parts
only PostgreSQL has coordinate replicas: chat leases, held datasets, shared rate limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from bot.domain import DatabaseState, utcnow
from storage.migrations import Migration
from storage.pg.base import Health, PgPart
from storage.pg.dataset import PgDatasetSource
from storage.pg.evals import PgEvalStore
from storage.pg.forget import PgForgetStore
from storage.pg.held import PgHeldDatasets
from storage.pg.inbox import PgInboxStore
from storage.pg.jobs import PgJobStore
from storage.pg.locks import PgLocks
from storage.pg.migrations import PG_MIGRATIONS
from storage.pg.rates import PgRateStore
from storage.pg.settings import PgSettingsStore
from storage.pg.stats import PgStatsStore
from storage.pg.threads import PgThreadStore

log = logging.getLogger(__name__)

# What the database raises when it cannot be reached or read.
DatabaseError = psycopg.Error

POOL_MIN = 2
POOL_MAX = 10
CLOSE_TIMEOUT = 2.0  # seconds close() waits for writes that cannot land
CONNECT_TIMEOUT = 10  # seconds to get a connection at start-up before giving up


class PgStore(PgPart):
    """Async repository over the PostgreSQL dialogue log: the database, and its parts."""

    shared = True  # several processes may use this database at once

    def __init__(self, pool: AsyncConnectionPool[Any], url: str) -> None:
        health = Health()
        super().__init__(pool, health)
        self.url = url
        self.dataset = PgDatasetSource(url)
        self.threads = PgThreadStore(pool, health)
        self.inbox = PgInboxStore(pool, health)
        self.jobs = PgJobStore(pool, health)
        self.stats = PgStatsStore(pool, health)
        self.settings = PgSettingsStore(pool, health)
        self.forget = PgForgetStore(pool, health)
        self.evals = PgEvalStore(pool, health, self.jobs)
        self.held = PgHeldDatasets(pool, health)
        self.rates = PgRateStore(pool, health)
        self.locks = PgLocks(url)

    @classmethod
    async def open(cls, url: str, *, max_size: int = POOL_MAX) -> PgStore:
        """Connect to the database at `url` and apply pending migrations (under a lock).

        Raises `DatabaseError` with the server's own words if it can't be reached.
        """
        # One connection first: the pool would only say it timed out, not why.
        probe = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT)
        await probe.close()
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=min(POOL_MIN, max_size),
            max_size=max_size,
            kwargs={"autocommit": True},
            open=False,
            timeout=CONNECT_TIMEOUT,
            name="parley",
        )
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        store = cls(pool, url)
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Let the writes asked for land (within CLOSE_TIMEOUT), then close the pool."""
        if self._health.writing:
            await asyncio.wait(list(self._health.writing), timeout=CLOSE_TIMEOUT)
        self._health.closed = True
        await self.locks.close()
        await self._pool.close()

    # -- migrations -------------------------------------------------------------------------

    async def schema_version(self) -> int:
        row = await self._fetch_one(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0"
            " ELSE (SELECT COALESCE(MAX(version), 0) FROM schema_migrations) END"
        )
        return int(row[0]) if row else 0

    async def migrate(self, migrations: Iterable[Migration] = PG_MIGRATIONS) -> int:
        """Apply every migration newer than the schema, in one transaction, under an advisory
        lock: replicas starting together wait for the first, then find nothing to do."""
        ordered = sorted(migrations, key=lambda m: m.version)
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('parley:migrate:' || current_schema()))"
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            row = await cur.fetchone()
            current = int(row[0]) if row else 0
            for migration in ordered:
                if migration.version <= current:
                    continue
                log.info("applying migration %04d %s", migration.version, migration.name)
                await conn.execute(migration.sql.encode())  # several statements: no params
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, utcnow()),
                )
                current = migration.version
        return current

    # -- the database as a whole -----------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False while storage fails: new updates can't be taken in."""
        return self._health.healthy

    async def checkpoint(self, attempts: int = 3) -> bool:
        """After /forget: PostgreSQL keeps deleted rows' old versions until they are vacuumed;
        VACUUM the tables /forget deletes from, so their pages no longer hold the words."""
        del attempts
        try:
            async with self._pool.connection() as conn:
                await conn.execute(
                    "VACUUM messages, turns, reactions, images, inbox, eval_items,"
                    " held_datasets, held_dataset_files"
                )
        except psycopg.Error as exc:
            log.warning("could not vacuum after /forget: %s", type(exc).__name__)
            return False
        return True

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (used by tests); explicit SQL, parameterised (%s)."""
        return await self._fetch_all(sql, params)


async def inspect(url: str) -> DatabaseState:
    """Look at the database without changing it (`python -m bot check`): its schema version,
    or why it can't be reached."""
    latest = max(m.version for m in PG_MIGRATIONS)
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=10, autocommit=True)
    except psycopg.Error as exc:
        return DatabaseState(False, latest=latest, problem="unreachable", detail=_first_line(exc))
    try:
        cur = await conn.execute(
            "SELECT to_regclass('schema_migrations') IS NOT NULL,"
            " EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = current_schema())"
        )
        row = await cur.fetchone()
        has_migrations, has_tables = bool(row and row[0]), bool(row and row[1])
        version = 0
        if has_migrations:
            cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            found = await cur.fetchone()
            version = int(found[0]) if found else 0
    except psycopg.Error as exc:
        return DatabaseState(True, latest=latest, problem="unreadable", detail=_first_line(exc))
    finally:
        await conn.close()
    if has_tables and not version:
        return DatabaseState(True, latest=latest, problem="foreign")
    if version > latest:
        return DatabaseState(True, version, latest, problem="newer")
    return DatabaseState(version > 0, version, latest)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
