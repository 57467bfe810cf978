"""Datasets /train built, held until their admin presses start, where every replica sees them.

The press may reach any replica, so the dataset waits here rather than in the memory of the
one that built it: the report and options as JSON (the service writes and reads them: no
types of the bot's here), the files' contents by name. Ages and expiry are by the server's
clock, which every replica shares.

Taking deletes the row and returns it in one statement: of two replicas pressing start at
once, the second's delete waits for the first's, then finds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg.types.json import Jsonb

from storage.pg.base import Conn, PgPart

# The lock that makes holding (pruning, then adding) one step among replicas.
_HOLD_LOCK = "SELECT pg_advisory_xact_lock(hashtext('parley:held:' || current_schema()))"


class PgHeldDatasets(PgPart):
    """Held datasets by token (the start and cancel buttons carry it)."""

    async def hold(
        self,
        token: str,
        admin_id: int,
        held: dict[str, Any],
        files: Mapping[str, bytes],
        *,
        ttl: float,
        limit: int,
    ) -> None:
        """Hold a dataset; expired ones go, and the oldest beyond `limit` - 1 make room."""

        async def work(conn: Conn) -> None:
            await conn.execute(_HOLD_LOCK)
            await conn.execute(
                "DELETE FROM held_datasets"
                " WHERE created_at <= clock_timestamp() - make_interval(secs => %s)",
                (float(ttl),),
            )
            await conn.execute(
                "DELETE FROM held_datasets WHERE token IN (SELECT token FROM held_datasets"
                " ORDER BY created_at DESC, token OFFSET %s)",
                (max(limit - 1, 0),),
            )
            await _insert(conn, token, admin_id, held, files, 0.0)

        await self._write(work)

    async def take(
        self, token: str, *, ttl: float
    ) -> tuple[int, dict[str, Any], dict[str, bytes], float] | None:
        """Remove a held dataset and return it: (admin id, JSON, files by name, its age in
        seconds); None if it isn't held, or has waited `ttl` seconds (it goes all the same).

        The files are read in the statement that deletes the row: they go with it (ON DELETE
        CASCADE), but the statement reads them as they were when it began.
        """

        async def work(conn: Conn) -> list[tuple[Any, ...]]:
            cur = await conn.execute(
                "WITH gone AS ("
                " DELETE FROM held_datasets WHERE token = %s"
                " RETURNING token, admin_id, held,"
                " EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS age)"
                " SELECT gone.admin_id, gone.held, gone.age, f.name, f.data FROM gone"
                " LEFT JOIN held_dataset_files f ON f.token = gone.token AND gone.age < %s",
                (token, float(ttl)),
                binary=True,
            )
            return list(await cur.fetchall())

        rows = await self._write(work)
        if not rows:
            return None
        admin_id, held, age = rows[0][:3]
        if age >= ttl:
            return None
        files = {name: bytes(data) for *_, name, data in rows if name is not None}
        return int(admin_id), held, files, float(age)

    async def put_back(
        self,
        token: str,
        admin_id: int,
        held: dict[str, Any],
        files: Mapping[str, bytes],
        *,
        age: float,
    ) -> None:
        """Hold again what `take` returned, as old as it was then (it expires on time)."""

        async def work(conn: Conn) -> None:
            await conn.execute(_HOLD_LOCK)
            await _insert(conn, token, admin_id, held, files, age)

        await self._write(work)

    async def drop(self, token: str) -> bool:
        """Let a held dataset go; whether it was there (expired or not)."""

        async def work(conn: Conn) -> int:
            cur = await conn.execute("DELETE FROM held_datasets WHERE token = %s", (token,))
            return cur.rowcount

        return await self._write(work) > 0

    async def clear(self) -> int:
        """Let every held dataset go, for every replica (/forget); how many there were."""

        async def work(conn: Conn) -> int:
            cur = await conn.execute("DELETE FROM held_datasets")
            return cur.rowcount

        return await self._write(work)


async def _insert(
    conn: Conn,
    token: str,
    admin_id: int,
    held: dict[str, Any],
    files: Mapping[str, bytes],
    age: float,
) -> None:
    await conn.execute(
        "INSERT INTO held_datasets (token, admin_id, held, created_at)"
        " VALUES (%s, %s, %s, clock_timestamp() - make_interval(secs => %s))",
        (token, admin_id, Jsonb(held), float(age)),
    )
    for name, data in files.items():
        # Binary: the contents go as they are, not as twice as long hex text.
        await conn.execute(
            "INSERT INTO held_dataset_files (token, name, data) VALUES (%s, %s, %b)",
            (token, name, data),
        )
