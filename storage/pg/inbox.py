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
from storage.inbox import INBOX_KEEP, INBOX_PAYLOAD_KEEP
from storage.pg.base import Conn, PgPart


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


class PgInboxStore(PgPart):
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

        async def accept(conn: Conn) -> set[int]:
            fresh = set()
            for update_id, payload in updates:
                lane = lanes.get(update_id)
                chat = lane.chat if lane is not None else NO_CHAT
                cur = await conn.execute(
                    "INSERT INTO inbox (update_id, payload, received_at, chat_id, topic_id,"
                    " media_group) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (update_id) DO NOTHING",
                    (
                        update_id,
                        payload,
                        now,
                        chat.chat_id,
                        chat.topic_id,
                        lane.media_group if lane is not None else None,
                    ),
                )
                if cur.rowcount:
                    fresh.add(update_id)
            return fresh

        return await self._write(accept, fail_fast=True)

    async def begin(self, update_id: int, max_attempts: int) -> tuple[int, bool] | None:
        """Count one more attempt at handling an update (see storage/inbox.py)."""
        now = utcnow()

        async def begin(conn: Conn) -> tuple[int, bool] | None:
            cur = await conn.execute(
                "SELECT attempts FROM inbox WHERE update_id = %s AND done_at IS NULL FOR UPDATE",
                (update_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            if attempts >= max_attempts:
                await conn.execute(
                    "UPDATE inbox SET quarantined_at = %s, done_at = %s, reason = %s"
                    " WHERE update_id = %s",
                    (now, now, f"handling started {attempts} times and never finished", update_id),
                )
                return attempts, True
            await conn.execute(
                "UPDATE inbox SET attempts = %s WHERE update_id = %s", (attempts + 1, update_id)
            )
            return attempts, False

        return await self._write(begin)

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
            await conn.execute(
                "UPDATE inbox SET done_at = %s WHERE update_id = ANY(%s) AND done_at IS NULL",
                (_iso(now), list(update_ids)),
            )
            await _inbox_sweep(conn, now)

        await self._write(done)

    async def pending(self) -> list[tuple[int, str]]:
        """Updates received but not handled, oldest first."""
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

        return await self._write(claim)

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

        return await self._write(release)

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

    async def renew(self, owner: str, ttl: float) -> int:
        """Extend every lease this replica holds; how many it holds."""

        async def renew(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE chat_leases SET expires_at = clock_timestamp()"
                " + make_interval(secs => %s) WHERE owner = %s",
                (ttl, owner),
            )
            return cur.rowcount

        return await self._write(renew)

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

        await self._write(release_all)


async def _inbox_sweep(conn: Conn, now: datetime) -> None:
    """As storage/inbox.py's: blank old JSON, delete old handled rows (partial indexes)."""
    await conn.execute(
        "UPDATE inbox SET payload = '' WHERE done_at < %s AND payload != ''"
        " AND quarantined_at IS NULL",
        (_iso(now - INBOX_PAYLOAD_KEEP),),
    )
    await conn.execute(
        "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < %s",
        (_iso(now - INBOX_KEEP),),
    )
