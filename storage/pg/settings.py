"""Settings changed in the bot (bot_settings) and the profile each chat uses, in PostgreSQL.
Mirrors storage/settings.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.domain import ChatKey, utcnow
from storage.pg.base import Conn, PgPart


class PgSettingsStore(PgPart):
    """Bot settings by key, and chat profiles."""

    async def get(self, key: str) -> str | None:
        row = await self._fetch_one("SELECT value FROM bot_settings WHERE key = %s", (key,))
        return str(row[0]) if row else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The settings among `keys` that are set, in one query."""
        rows = await self._fetch_all(
            "SELECT key, value FROM bot_settings WHERE key = ANY(%s)", (list(keys),)
        )
        return {str(k): str(v) for k, v in rows}

    async def set_many(self, values: Mapping[str, str]) -> None:
        """Set several settings at once: no reader sees some changed and not the others."""
        now = utcnow()

        async def upsert(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO bot_settings (key, value, updated_at) VALUES (%s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                    " updated_at = excluded.updated_at",
                    [(k, v, now) for k, v in values.items()],
                )

        await self._write(upsert)

    async def set(self, key: str, value: str) -> None:
        now = utcnow()

        async def upsert(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO bot_settings (key, value, updated_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, now),
            )

        await self._write(upsert)

    async def chat_profile(self, key: ChatKey) -> str | None:
        row = await self._fetch_one(
            "SELECT profile FROM chat_profiles WHERE chat_id = %s AND topic_id = %s",
            (key.chat_id, key.topic_id),
        )
        return str(row[0]) if row else None

    async def set_chat_profile(self, key: ChatKey, profile: str) -> None:
        now = utcnow()

        async def upsert(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO chat_profiles (chat_id, topic_id, profile, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (chat_id, topic_id) DO UPDATE"
                " SET profile = excluded.profile, updated_at = excluded.updated_at",
                (key.chat_id, key.topic_id, profile, now),
            )

        await self._write(upsert)
