"""Settings changed in the bot (bot_settings) and the profile each chat uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bot.domain import ChatKey, utcnow
from storage.base import Part


class SettingsStore(Part):
    """Bot settings by key, and chat profiles."""

    async def get(self, key: str) -> str | None:
        async with self._conn.execute(
            "SELECT value FROM bot_settings WHERE key = ?", (key,)
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        """The settings among `keys` that are set, in one query."""
        marks = ", ".join("?" for _ in keys)
        rows = await self._fetch_all(
            f"SELECT key, value FROM bot_settings WHERE key IN ({marks})", tuple(keys)
        )
        return {str(k): str(v) for k, v in rows}

    async def set_many(self, values: Mapping[str, str]) -> None:
        """Set several settings at once: no reader sees some changed and not the others."""
        now = utcnow()
        await self._write(
            lambda conn: conn.executemany(
                "INSERT INTO bot_settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                [(k, v, now) for k, v in values.items()],
            )
        )

    async def set(self, key: str, value: str) -> None:
        now = utcnow()
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO bot_settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, now),
            )
        )

    async def chat_profile(self, key: ChatKey) -> str | None:
        async with self._conn.execute(
            "SELECT profile FROM chat_profiles WHERE chat_id = ? AND topic_id = ?",
            (key.chat_id, key.topic_id),
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_chat_profile(self, key: ChatKey, profile: str) -> None:
        now = utcnow()
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO chat_profiles (chat_id, topic_id, profile, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (chat_id, topic_id) DO UPDATE"
                " SET profile = excluded.profile, updated_at = excluded.updated_at",
                (key.chat_id, key.topic_id, profile, now),
            )
        )
