"""The inbox of received updates on PostgreSQL: as storage/inbox.py, plus what replicas
share through it.

Any replica may receive an update (the load balancer picks one); it is stored with its chat.
One replica at a time holds a chat's lease and handles that chat's pending updates, oldest
first, whichever replica received them: that keeps each chat in order across replicas. A
lease lasts `ttl` seconds and is renewed while its replica lives; the leases of a replica
that died expire, and another replica takes those chats over and replays what was left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from bot.domain import NO_CHAT, ChatKey, Lane, PendingUpdate, utcnow
from storage.inbox import INBOX_KEEP, INBOX_PAYLOAD_KEEP, InboxReads
from storage.pg.base import Conn, PgPart


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


class PgInboxStore(PgPart, InboxReads):
    """Received updates, from taken in to handled or set aside; chat leases."""

    async def accept(
        self, updates: Sequence[tuple[int, str]], lanes: Mapping[int, Lane] | None = None
    ) -> set[int]:
        """Persist received updates (id, JSON) with their lanes; the ids not seen before.

        Raises `StorageUnavailable` at once while storage fails: Telegram still holds them.
        """
        if not updates:
            return set()
        now = utcnow()
        lanes = lanes or {}

        rows = []
        for update_id, payload in updates:
            lane = lanes.get(update_id)
            chat = lane.chat if lane is not None else NO_CHAT
            group = lane.media_group if lane is not None else None
            rows.append((update_id, payload, now, chat.chat_id, chat.topic_id, group))

        async def accept(conn: Conn) -> set[int]:
            # One statement for the batch: atomic without a transaction around it.
            cur = await conn.execute(
                "INSERT INTO inbox (update_id, payload, received_at, chat_id, topic_id,"
                " media_group) SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[],"
                " %s::bigint[], %s::bigint[], %s::text[])"
                " ON CONFLICT (update_id) DO NOTHING RETURNING update_id",
                [list(column) for column in zip(*rows, strict=True)],
            )
            return {int(row[0]) for row in await cur.fetchall()}

        return await self._write(accept, fail_fast=True, single=True)

    async def begin(self, update_id: int, max_attempts: int) -> tuple[int, bool] | None:
        """Count one more attempt at handling an update (see storage/inbox.py)."""
        now = utcnow()

        async def begin(conn: Conn) -> tuple[int, bool] | None:
            # One statement: counts the attempt, or sets the update aside at the limit.
            cur = await conn.execute(
                "UPDATE inbox SET"
                " attempts = CASE WHEN attempts >= %(most)s THEN attempts ELSE attempts + 1 END,"
                " quarantined_at = CASE WHEN attempts >= %(most)s THEN %(now)s"
                " ELSE quarantined_at END,"
                " done_at = CASE WHEN attempts >= %(most)s THEN %(now)s ELSE done_at END,"
                " reason = CASE WHEN attempts >= %(most)s"
                " THEN 'handling started ' || attempts || ' times and never finished'"
                " ELSE reason END"
                " WHERE update_id = %(id)s AND done_at IS NULL"
                " RETURNING attempts, done_at IS NOT NULL",
                {"most": max_attempts, "now": now, "id": update_id},
            )
            row = await cur.fetchone()
            if row is None:
                return None
            attempts, set_aside = int(row[0]), bool(row[1])
            return (attempts, True) if set_aside else (attempts - 1, False)

        return await self._write(begin, single=True)

    async def quarantine(self, update_ids: Sequence[int], reason: str) -> None:
        """Set updates aside unhandled, with the reason."""
        if not update_ids:
            return
        now = utcnow()

        async def quarantine(conn: Conn) -> None:
            await conn.execute(
                "UPDATE inbox SET quarantined_at = %s, done_at = %s, reason = %s"
                " WHERE update_id = ANY(%s) AND done_at IS NULL",
                (now, now, reason, list(update_ids)),
            )

        await self._write(quarantine)

    async def done(self, update_ids: Sequence[int]) -> None:
        """Mark updates handled, and forget what earlier handled ones no longer need."""
        now = datetime.now(UTC)

        async def done(conn: Conn) -> None:
            # One statement (no transaction round trips): mark them, and sweep (below).
            await conn.execute(
                "WITH handled AS (UPDATE inbox SET done_at = %(now)s"
                " WHERE update_id = ANY(%(ids)s) AND done_at IS NULL RETURNING 1),"
                f" blanked AS ({_BLANK} AND received_at >= %(keep)s RETURNING 1),"
                f" gone AS ({_DELETE} RETURNING 1) SELECT 1",
                {"now": _iso(now), "ids": list(update_ids), **_cutoffs(now)},
            )

        await self._write(done, single=True)

    async def purge(self, before: str) -> None:
        """Forget handled updates received before `before` (they only served to dedupe)."""

        async def purge(conn: Conn) -> None:
            await conn.execute(
                "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < %s", (before,)
            )
            await _inbox_sweep(conn, datetime.now(UTC))

        await self._write(purge, fail_fast=True)

    # -- what replicas share ---------------------------------------------------------------

    async def claim(self, chat: ChatKey, owner: str, ttl: float) -> bool:
        """Take (or keep) the chat's lease for `ttl` seconds; False if another replica holds
        a live one. A lease being released concurrently is waited for, then decided."""

        async def claim(conn: Conn) -> bool:
            cur = await conn.execute(
                "INSERT INTO chat_leases (chat_id, topic_id, owner, expires_at)"
                " VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))"
                " ON CONFLICT (chat_id, topic_id) DO UPDATE"
                " SET owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE chat_leases.owner = excluded.owner"
                " OR chat_leases.expires_at < clock_timestamp()"
                " RETURNING owner",
                (chat.chat_id, chat.topic_id, owner, ttl),
            )
            return await cur.fetchone() is not None

        return await self._write(claim, single=True)

    async def release(self, chat: ChatKey, owner: str) -> bool:
        """Give the chat's lease up if nothing of the chat is pending; False if something
        is (the caller goes on handling it) or the lease is no longer this replica's."""

        async def release(conn: Conn) -> bool:
            cur = await conn.execute(
                "DELETE FROM chat_leases l WHERE l.chat_id = %s AND l.topic_id = %s"
                " AND l.owner = %s AND NOT EXISTS (SELECT 1 FROM inbox i"
                " WHERE i.chat_id = l.chat_id AND i.topic_id = l.topic_id"
                " AND i.done_at IS NULL) RETURNING 1",
                (chat.chat_id, chat.topic_id, owner),
            )
            return await cur.fetchone() is not None

        return await self._write(release, single=True)

    async def holds(self, chat: ChatKey, owner: str) -> bool:
        row = await self._fetch_one(
            "SELECT 1 FROM chat_leases WHERE chat_id = %s AND topic_id = %s AND owner = %s"
            " AND expires_at > clock_timestamp()",
            (chat.chat_id, chat.topic_id, owner),
        )
        return row is not None

    async def chat_pending(self, chat: ChatKey, limit: int = 20) -> list[PendingUpdate]:
        """The chat's pending updates, oldest first."""
        rows = await self._fetch_all(
            "SELECT update_id, payload, attempts, media_group,"
            " extract(epoch FROM clock_timestamp() - arrived)::float8"
            " FROM inbox WHERE chat_id = %s AND topic_id = %s AND done_at IS NULL"
            " ORDER BY update_id LIMIT %s",
            (chat.chat_id, chat.topic_id, limit),
        )
        return [PendingUpdate(int(u), str(p), int(a), g, float(age)) for u, p, a, g, age in rows]

    async def renew(self, owner: str, ttl: float, chats: Sequence[ChatKey]) -> list[ChatKey]:
        """Extend this replica's leases of `chats` (those it still handles); the ones it
        still held, so renewed."""
        if not chats:
            return []

        async def renew(conn: Conn) -> list[ChatKey]:
            cur = await conn.execute(
                "UPDATE chat_leases l SET expires_at = clock_timestamp()"
                " + make_interval(secs => %s) FROM unnest(%s::bigint[], %s::bigint[])"
                " AS c (chat_id, topic_id) WHERE l.owner = %s AND l.chat_id = c.chat_id"
                " AND l.topic_id = c.topic_id RETURNING l.chat_id, l.topic_id",
                (ttl, [c.chat_id for c in chats], [c.topic_id for c in chats], owner),
            )
            return [ChatKey(int(c), int(t)) for c, t in await cur.fetchall()]

        return await self._write(renew, single=True)

    async def give_up(self, chat: ChatKey, owner: str) -> None:
        """Drop this replica's lease of the chat whatever waits (its lane failed): any
        replica takes the chat over at its next look."""

        async def give_up(conn: Conn) -> None:
            await conn.execute(
                "DELETE FROM chat_leases WHERE chat_id = %s AND topic_id = %s AND owner = %s",
                (chat.chat_id, chat.topic_id, owner),
            )

        await self._write(give_up, single=True)

    async def orphaned(self, limit: int = 100) -> list[ChatKey]:
        """Chats with pending updates and no live lease: their replica died, or nobody has
        claimed them yet."""
        rows = await self._fetch_all(
            "SELECT DISTINCT i.chat_id, i.topic_id FROM inbox i"
            " WHERE i.done_at IS NULL AND NOT EXISTS (SELECT 1 FROM chat_leases l"
            " WHERE l.chat_id = i.chat_id AND l.topic_id = i.topic_id"
            " AND l.expires_at > clock_timestamp()) LIMIT %s",
            (limit,),
        )
        return [ChatKey(int(c), int(t)) for c, t in rows]

    async def release_all(self, owner: str) -> None:
        """Give up every lease of this replica (it stops): others take its chats at once."""

        async def release_all(conn: Conn) -> None:
            await conn.execute("DELETE FROM chat_leases WHERE owner = %s", (owner,))

        await self._write(release_all, single=True)


# Blank the JSON of updates handled more than INBOX_PAYLOAD_KEEP ago; delete the rows of
# handled updates received more than INBOX_KEEP ago. Both are ranges of partial indexes
# holding only the rows still to be swept, so this costs a few rows, never a scan.
_BLANK = (
    "UPDATE inbox SET payload = '' WHERE done_at < %(blank)s AND payload != ''"
    " AND quarantined_at IS NULL"
)
_DELETE = "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < %(keep)s"


def _cutoffs(now: datetime) -> dict[str, str]:
    return {"blank": _iso(now - INBOX_PAYLOAD_KEEP), "keep": _iso(now - INBOX_KEEP)}


async def _inbox_sweep(conn: Conn, now: datetime) -> None:
    """As storage/inbox.py's `_inbox_sweep`."""
    await conn.execute(_BLANK, _cutoffs(now))
    await conn.execute(_DELETE, _cutoffs(now))
