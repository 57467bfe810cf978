"""Named locks held by one replica at a time: PostgreSQL session advisory locks, each on a
connection of its own (not the pool's), so a lock lasts exactly as long as its holder's
connection: a replica that dies, or loses the database, loses its locks with it.

Used for what only one process may do at once: long polling (Telegram would hand each
update to one poller at random) and following fine-tuning jobs (each notice must reach the
admin once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10


class PgLocks:
    """Advisory locks by name, each on its own connection to the database at `url`."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._held: dict[str, psycopg.AsyncConnection[Any]] = {}

    async def acquire(self, name: str) -> bool:
        """Take the lock `name` if it is free (or keep it); False if another process holds
        it. Never waits. A lock whose connection broke is reported lost and tried again."""
        conn = self._held.get(name)
        if conn is not None:
            try:
                await conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lost the lock %r with its connection", name)
                await self._drop(name)
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except psycopg.Error:
            return False
        try:
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtext('parley:' || current_schema() || ':' || %s))",
                (name,),
            )
            row = await cur.fetchone()
        except psycopg.Error:
            await conn.close()
            return False
        except BaseException:  # cancelled: the session (and any lock it took) goes with it
            await asyncio.shield(conn.close())
            raise
        if not (row and row[0]):
            await conn.close()
            return False
        self._held[name] = conn
        return True

    async def close(self) -> None:
        for name in list(self._held):
            await self._drop(name)

    async def _drop(self, name: str) -> None:
        conn = self._held.pop(name, None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()  # closing the session releases its advisory locks
