"""The inbox of received updates: taken in before they are handled, counted as they are
tried, marked done or set aside (quarantined), and swept once they only serve to dedupe."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.domain import Lane, utcnow
from storage.base import Part

# A handled update is kept only so that Telegram delivering it again is recognised (that
# happens within a day). Its JSON, message text included, is blanked this long after it
# was handled (a minute to look at what just happened); quarantined updates keep theirs
# for diagnosis. The row itself goes INBOX_KEEP after it arrived.
INBOX_PAYLOAD_KEEP = timedelta(minutes=1)
INBOX_KEEP = timedelta(days=2)


class InboxReads:
    """The inbox's reads, whose SQL both databases speak alike (storage/pg/inbox.py too)."""

    async def _fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # the store part's

    async def pending(self) -> list[tuple[int, str]]:
        """Updates received but not handled (a crash), oldest first."""
        return [
            (int(u), str(p))
            for u, p in await self._fetch_all(
                "SELECT update_id, payload FROM inbox WHERE done_at IS NULL ORDER BY update_id"
            )
        ]

    async def tried(self) -> dict[int, int]:
        """Attempts of the pending updates whose handling started before (and never ended)."""
        return {
            int(u): int(a)
            for u, a in await self._fetch_all(
                "SELECT update_id, attempts FROM inbox WHERE done_at IS NULL AND attempts > 0"
            )
        }

    async def quarantined(self) -> list[tuple[int, int, str]]:
        """(update id, attempts, reason) of every update set aside, oldest first."""
        return [
            (int(u), int(a), str(r))
            for u, a, r in await self._fetch_all(
                "SELECT update_id, attempts, reason FROM inbox"
                " WHERE quarantined_at IS NOT NULL ORDER BY update_id"
            )
        ]


class InboxStore(Part, InboxReads):
    """Received updates, from taken in to handled or set aside."""

    async def accept(
        self, updates: Sequence[tuple[int, str]], lanes: Mapping[int, Lane] | None = None
    ) -> set[int]:
        """Persist received updates (id, JSON); returns the ids not seen before.

        `lanes` (each update's chat and album) matter only where replicas share the inbox
        (storage/pg/inbox.py): one process orders its chats in memory (bot/concurrency.py).

        Raises `StorageUnavailable` at once while storage fails: Telegram still holds them.
        """
        if not updates:
            return set()
        now = utcnow()

        def accept(conn: sqlite3.Connection) -> set[int]:
            fresh = set()
            for update_id, payload in updates:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO inbox (update_id, payload, received_at)"
                    " VALUES (?, ?, ?)",
                    (update_id, payload, now),
                )
                if cur.rowcount:
                    fresh.add(update_id)
            return fresh

        return await self._writer.write(accept, fail_fast=True)

    async def begin(self, update_id: int, max_attempts: int) -> tuple[int, bool] | None:
        """Count one more attempt at handling an update, before it starts.

        Returns (attempts before this one, set aside): an update whose handling has already
        started `max_attempts` times without finishing (each a crash, or a stop that cut it
        off) is quarantined instead, with its reason. None if the inbox doesn't hold it.
        """
        now = utcnow()

        def begin(conn: sqlite3.Connection) -> tuple[int, bool] | None:
            row = conn.execute(
                "SELECT attempts FROM inbox WHERE update_id = ? AND done_at IS NULL",
                (update_id,),
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            if attempts >= max_attempts:
                conn.execute(
                    "UPDATE inbox SET quarantined_at = ?, done_at = ?, reason = ?"
                    " WHERE update_id = ?",
                    (now, now, f"handling started {attempts} times and never finished", update_id),
                )
                return attempts, True
            conn.execute(
                "UPDATE inbox SET attempts = ? WHERE update_id = ?", (attempts + 1, update_id)
            )
            return attempts, False

        return await self._write(begin)

    async def quarantine(self, update_ids: Sequence[int], reason: str) -> None:
        """Set updates aside unhandled, with the reason (e.g. parts of a quarantined album)."""
        now = utcnow()
        await self._write(
            lambda conn: conn.executemany(
                "UPDATE inbox SET quarantined_at = ?, done_at = ?, reason = ?"
                " WHERE update_id = ? AND done_at IS NULL",
                [(now, now, reason, u) for u in update_ids],
            )
        )

    async def done(self, update_ids: Sequence[int]) -> None:
        """Mark updates handled, and forget what earlier handled ones no longer need.

        Continuous housekeeping in the same write: see `_inbox_sweep`.
        """
        now = datetime.now(UTC)

        def done(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE inbox SET done_at = ? WHERE update_id = ? AND done_at IS NULL",
                [(_iso(now), u) for u in update_ids],
            )
            _inbox_sweep(conn, now)

        await self._write(done)

    async def purge(self, before: str) -> None:
        """Forget handled updates received before `before` (they only served to dedupe).

        Housekeeping: while storage fails it raises `StorageUnavailable` rather than wait.
        """

        def purge(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < ?", (before,)
            )
            _inbox_sweep(conn, datetime.now(UTC))

        await self._writer.write(purge, fail_fast=True)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _inbox_sweep(conn: sqlite3.Connection, now: datetime) -> None:
    """Blank the JSON of updates handled more than INBOX_PAYLOAD_KEEP ago; delete the rows
    of handled updates received more than INBOX_KEEP ago.

    Both are ranges of partial indexes (migration 9) holding only the rows still to be
    swept, so running this with every `done` costs a few rows, never a scan.
    """
    conn.execute(
        "UPDATE inbox SET payload = '' WHERE done_at < ? AND payload != ''"
        " AND quarantined_at IS NULL",
        (_iso(now - INBOX_PAYLOAD_KEEP),),
    )
    conn.execute(
        "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < ?",
        (_iso(now - INBOX_KEEP),),
    )
