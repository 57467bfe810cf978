"""Feedback and figures: reactions on replies, sentiment and reaction counts, token usage."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from bot.domain import utcnow
from storage.base import Part


class StatsStore(Part):
    """Reactions on replies and the figures /stats and the daily limit read."""

    async def set_reactions(
        self, chat_id: int, message_id: int, user_id: int, reactions: Sequence[tuple[str, int]]
    ) -> bool:
        """Replace a user's reactions on a bot reply; False if the message is not a reply."""
        now = utcnow()

        def replace(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT turn_id FROM reply_messages WHERE chat_id = ? AND message_id = ?",
                (chat_id, message_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "DELETE FROM reactions WHERE chat_id = ? AND message_id = ? AND user_id = ?",
                (chat_id, message_id, user_id),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO reactions (chat_id, message_id, user_id, emoji, polarity,"
                " turn_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(chat_id, message_id, user_id, e, p, row[0], now) for e, p in reactions],
            )
            return True

        return await self._write(replace)

    async def sentiment_counts(self, since: str | None = None) -> dict[str, dict[str, int]]:
        """Counts of sentiment labels per role ('user', 'assistant'), optionally since a time."""
        counts: dict[str, dict[str, int]] = {
            role: {"positive": 0, "neutral": 0, "negative": 0} for role in ("user", "assistant")
        }
        async with self._conn.execute(
            "SELECT role, sentiment_label, COUNT(*) FROM messages"
            " WHERE sentiment_label IS NOT NULL AND (? IS NULL OR created_at >= ?)"
            " GROUP BY role, sentiment_label",
            (since, since),
        ) as cur:
            async for role, label, n in cur:
                counts[role][label] = n
        return counts

    async def reaction_counts(self, since: str | None = None) -> dict[int, int]:
        """Reactions on replies by polarity (1, 0, -1), optionally since a time."""
        counts = {1: 0, 0: 0, -1: 0}
        async with self._conn.execute(
            "SELECT polarity, COUNT(*) FROM reactions WHERE ? IS NULL OR created_at >= ?"
            " GROUP BY polarity",
            (since, since),
        ) as cur:
            async for polarity, n in cur:
                counts[polarity] = n
        return counts

    async def turns_since(self, user_id: int, since: str) -> int:
        """How many turns a user started since `since` (for the daily limit)."""
        async with self._conn.execute(
            "SELECT COUNT(*) FROM turns WHERE user_id = ? AND started_at >= ?", (user_id, since)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def usage(self, column: str, since: str | None, limit: int = 5) -> list[tuple[int, int]]:
        """Top `user_id`s or `chat_id`s by tokens used (input + output), optionally since."""
        if column not in ("user_id", "chat_id"):
            raise ValueError(column)
        async with self._conn.execute(
            f"SELECT {column}, SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)) AS n"
            f" FROM turns WHERE {column} IS NOT NULL AND (? IS NULL OR started_at >= ?)"
            f" GROUP BY {column} ORDER BY n DESC LIMIT ?",
            (since, since, limit),
        ) as cur:
            return [(int(k), int(n)) async for k, n in cur]

    async def total_tokens(self, since: str | None) -> int:
        """Tokens used by every turn (input + output), optionally since a time."""
        async with self._conn.execute(
            "SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)"
            " FROM turns WHERE ? IS NULL OR started_at >= ?",
            (since, since),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0
