"""Telling the bot's admins about problems only they can fix: a refused API key, a missing model.

A user who meets such a problem hears that the admins know only when they do. Each admin
gets a direct message in their language, at most once an hour for the same problem; when
that was, and whether it reached anyone, is a bot setting, so a restart (or a crash loop)
does not tell them again within the hour.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from telegram import Bot
from telegram.error import TelegramError

from bot.texts import t
from storage.interface import SettingsStore

log = logging.getLogger(__name__)

ALERT_INTERVAL = timedelta(hours=1)
# Model error kinds that only an admin can fix; each has an `alert.<kind>` message.
ADMIN_PROBLEMS = frozenset({"auth", "not_found"})


def admin_language_key(admin_id: int) -> str:
    """The bot setting holding the language an admin's notices are written in."""
    return f"notice_language:{admin_id}"


@dataclass(frozen=True, slots=True)
class Notice:
    """The last time the admins were alerted about one problem, and whether any got it."""

    at: datetime
    told: bool


class AdminAlerts:
    """Direct messages to the admins about a problem, at most once per problem per interval."""

    def __init__(
        self,
        settings: SettingsStore,
        admin_ids: frozenset[int],
        *,
        interval: timedelta = ALERT_INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.admin_ids = admin_ids
        self.interval = interval
        self.clock = clock
        self._notices: dict[str, Notice] = {}
        self._languages: dict[int, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def language_of(self, admin_id: int) -> str | None:
        """The Telegram language code an admin last used with an admin command, if known."""
        lang = self._languages.get(admin_id)
        if lang is None:
            lang = await self.settings.get(admin_language_key(admin_id))
            if lang is not None:
                self._languages[admin_id] = lang
        return lang

    async def remember_language(self, admin_id: int, language_code: str | None) -> None:
        """Write an admin's notices in `language_code` from now on (stored when it changes)."""
        if language_code and await self.language_of(admin_id) != language_code:
            await self.settings.set(admin_language_key(admin_id), language_code)
            self._languages[admin_id] = language_code

    async def report(self, bot: Bot, problem: str, key: str, **values: object) -> bool:
        """Tell every admin about `problem` (message `alert.<problem>` with `values`) unless
        they were alerted about `key` within the interval. Whether the admins know now."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # two chats meeting the problem at once send one alert
            now = self.clock()
            last = await self._last(key)
            if last is not None and now - last.at < self.interval:
                return last.told
            told = False
            for admin_id in sorted(self.admin_ids):
                text = t(f"alert.{problem}", lang=await self.language_of(admin_id), **values)
                try:
                    await bot.send_message(admin_id, text)
                    told = True
                except TelegramError as exc:
                    # e.g. an admin who never started the bot: Telegram has no chat to send to.
                    log.warning("could not alert admin %s: %s", admin_id, type(exc).__name__)
            log.warning("admins alerted about %s: %s", key, "told" if told else "none reached")
            await self._record(key, Notice(now, told))
            return told

    async def _last(self, key: str) -> Notice | None:
        notice = self._notices.get(key)
        if notice is None or self.clock() - notice.at >= self.interval:
            # Nothing recent known here: another replica may have alerted since.
            raw = await self.settings.get(f"alert:{key}")
            if raw is not None:
                try:
                    data = json.loads(raw)
                    notice = Notice(datetime.fromisoformat(data["at"]), bool(data["told"]))
                except (ValueError, KeyError, TypeError):
                    notice = None
            if notice is not None:
                self._notices[key] = notice
        return notice

    async def _record(self, key: str, notice: Notice) -> None:
        self._notices[key] = notice
        value = json.dumps({"at": notice.at.isoformat(), "told": notice.told})
        try:
            await self.settings.set(f"alert:{key}", value)
        except Exception:
            # Kept in memory all the same: the limit holds until a restart.
            log.exception("could not record the alert about %s", key)
