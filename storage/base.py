"""What every part of the store shares: one aiosqlite connection for reads and the one
writer (`storage.writer.Writer`) that every write goes through."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

import aiosqlite

from storage.writer import Writer

T = TypeVar("T")


class Part:
    """One concern of the store (threads, the inbox, jobs...), over the shared connections."""

    def __init__(self, conn: aiosqlite.Connection, writer: Writer) -> None:
        self._conn = conn
        self._writer = writer

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` (plain sqlite3 calls) as one transaction of the writer's; its result."""
        return await self._writer.write(work)

    async def _fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Run a read query; explicit SQL, parameterised."""
        async with self._conn.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    async def _file(self) -> str:
        """The database file's path, as the reader's connection opened it."""
        rows = await self._fetch_all("SELECT file FROM pragma_database_list WHERE name = 'main'")
        return str(rows[0][0])
