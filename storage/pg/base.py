"""What every part of the PostgreSQL store shares: the connection pool, and how writes and
reads behave while the database is unreachable.

A write is an async function of a connection, run in one transaction. As in SQLite's writer
(storage/writer.py), writes are of two kinds while storage fails (the server is down or
restarting, the network is cut, the disk is full): a *fail-fast* write (taking in a new
update) raises `StorageUnavailable` at once, and Telegram keeps the update; every other
write is the record of something already done and is retried, with capped exponential
backoff, until it lands. A transaction the server rolled back to keep replicas consistent
(a serialization failure, a deadlock) is run again at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg_pool import AsyncConnectionPool

from bot.errors import StorageUnavailable, WriterClosed

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Work = Callable[[Conn], Awaitable[T]]

RETRY_FIRST = 0.25  # seconds before the first retry while storage fails; doubles each time
RETRY_MAX = 5.0  # ... up to this
FAIL_FAST_TRIES = 2  # a pooled connection the server dropped fails once: try a fresh one


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` is the database being unreachable or out of resources (retry later)
    rather than a problem with the statement."""
    return isinstance(exc, psycopg.OperationalError | OSError)


def _conflict(exc: BaseException) -> bool:
    return isinstance(exc, errors.SerializationFailure | errors.DeadlockDetected)


class Health:
    """Shared by the parts: whether writes land, and whether the store is closing."""

    def __init__(self) -> None:
        self.healthy = True
        self.closed = False
        self.writing: set[asyncio.Task[Any]] = set()  # writes under way (close waits)

    def track(self, task: asyncio.Task[Any]) -> None:
        self.writing.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.writing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that was cancelled no longer will

    def failed(self, exc: BaseException) -> None:
        if self.healthy:
            log.error("database unavailable (%s): retrying", type(exc).__name__)
        self.healthy = False

    def recovered(self) -> None:
        if not self.healthy:
            log.warning("database available again")
        self.healthy = True


class PgPart:
    """One concern of the store (threads, the inbox, jobs...), over the shared pool."""

    def __init__(self, pool: AsyncConnectionPool[Any], health: Health) -> None:
        self._pool = pool
        self._health = health

    async def _write(self, work: Work[T], *, fail_fast: bool = False, single: bool = False) -> T:
        """Run `work` in one transaction; its result (see the module's docstring).

        A write, once asked for, is carried out even if its caller is cancelled (as in
        SQLite's writer): it records something already done, such as a reply sent.
        `single`: `work` runs one statement, atomic by itself, so no BEGIN and COMMIT (two
        round trips saved on the writes every message makes).
        """
        task = asyncio.ensure_future(self._attempts(work, fail_fast, single))
        self._health.track(task)
        return await asyncio.shield(task)

    async def _attempts(self, work: Work[T], fail_fast: bool, single: bool) -> T:
        delay, tries = RETRY_FIRST, 0
        while True:
            if self._health.closed:
                raise WriterClosed("the store is closed")
            tries += 1
            try:
                async with self._pool.connection() as conn:
                    if single:
                        result = await work(conn)
                    else:
                        async with conn.transaction():
                            result = await work(conn)
            except Exception as exc:
                if _conflict(exc):
                    continue
                if not is_storage_error(exc):
                    raise
                self._health.failed(exc)
                if fail_fast and tries >= FAIL_FAST_TRIES:
                    raise StorageUnavailable("the database is unavailable") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._health.recovered()
            return result

    async def _fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run a read query; explicit SQL, parameterised (%s placeholders)."""
        for attempt in range(FAIL_FAST_TRIES):
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(sql, params)
                    return list(await cur.fetchall())
            except Exception as exc:
                if not is_storage_error(exc) or attempt + 1 >= FAIL_FAST_TRIES:
                    raise
        raise AssertionError("unreachable")

    async def _fetch_one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        rows = await self._fetch_all(sql, params)
        return rows[0] if rows else None
