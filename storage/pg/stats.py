"""Feedback and figures in PostgreSQL: reactions on replies, sentiment and reaction counts,
token usage. Mirrors storage/stats.py."""

from __future__ import annotations

from collections.abc import Sequence

from bot.domain import utcnow
from storage.pg.base import Conn, PgPart


class PgStatsStore(PgPart):
    """Reactions on replies and the figures /stats and the daily limit read."""

    async def set_reactions(
        self, chat_id: int, message_id: int, user_id: int, reactions: Sequence[tuple[str, int]]
    ) -> bool:
        """Replace a user's reactions on a bot reply; False if the message is not a reply."""
        now = utcnow()

        async def replace(conn: Conn) -> bool:
            # FOR UPDATE: replacements on one reply follow each other, whichever replicas
            # make them, so the last one is what stays.
            cur = await conn.execute(
                "SELECT turn_id FROM reply_messages WHERE chat_id = %s AND message_id = %s"
                " FOR UPDATE",
                (chat_id, message_id),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            await conn.execute(
                "DELETE FROM reactions WHERE chat_id = %s AND message_id = %s AND user_id = %s",
                (chat_id, message_id, user_id),
            )
            async with conn.cursor() as many:
                await many.executemany(
                    "INSERT INTO reactions (chat_id, message_id, user_id, emoji, polarity,"
                    " turn_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    [(chat_id, message_id, user_id, e, p, row[0], now) for e, p in reactions],
                )
            return True

        return await self._write(replace)

    async def sentiment_counts(self, since: str | None = None) -> dict[str, dict[str, int]]:
        """Counts of sentiment labels per role ('user', 'assistant'), optionally since a time."""
        counts: dict[str, dict[str, int]] = {
            role: {"positive": 0, "neutral": 0, "negative": 0} for role in ("user", "assistant")
        }
        for role, label, n in await self._fetch_all(
            "SELECT role, sentiment_label, COUNT(*) FROM messages"
            " WHERE sentiment_label IS NOT NULL AND (%s::text IS NULL OR created_at >= %s)"
            " GROUP BY role, sentiment_label",
            (since, since),
        ):
            counts[role][label] = int(n)
        return counts

    async def reaction_counts(self, since: str | None = None) -> dict[int, int]:
        """Reactions on replies by polarity (1, 0, -1), optionally since a time."""
        counts = {1: 0, 0: 0, -1: 0}
        for polarity, n in await self._fetch_all(
            "SELECT polarity, COUNT(*) FROM reactions"
            " WHERE %s::text IS NULL OR created_at >= %s GROUP BY polarity",
            (since, since),
        ):
            counts[int(polarity)] = int(n)
        return counts

    async def turns_since(self, user_id: int, since: str) -> int:
        """How many turns a user started since `since` (for the daily limit)."""
        row = await self._fetch_one(
            "SELECT COUNT(*) FROM turns WHERE user_id = %s AND started_at >= %s",
            (user_id, since),
        )
        return int(row[0]) if row else 0

    async def usage(self, column: str, since: str | None, limit: int = 5) -> list[tuple[int, int]]:
        """Top `user_id`s or `chat_id`s by tokens used (input + output), optionally since."""
        if column not in ("user_id", "chat_id"):
            raise ValueError(column)
        rows = await self._fetch_all(
            f"SELECT {column}, SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)) AS n"
            f" FROM turns WHERE {column} IS NOT NULL AND (%s::text IS NULL OR started_at >= %s)"
            f" GROUP BY {column} ORDER BY n DESC LIMIT %s",
            (since, since, limit),
        )
        return [(int(k), int(n)) for k, n in rows]

    async def total_tokens(self, since: str | None) -> int:
        """Tokens used by every turn (input + output), optionally since a time."""
        row = await self._fetch_one(
            "SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)"
            " FROM turns WHERE %s::text IS NULL OR started_at >= %s",
            (since, since),
        )
        return int(row[0]) if row else 0
