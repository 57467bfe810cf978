"""Names for the user and chat ids that admins read (/stats), asked from Telegram.

The dialogue log keeps ids only, and nothing more about people is stored: a name is asked
with getChat when an admin looks, for a handful of ids at a time (concurrently, each within
a few seconds), and kept in memory for a few minutes. A chat Telegram won't describe (a user
who never started the bot, a group the bot has left) stays a bare id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

from telegram import Bot, ChatFullInfo
from telegram.error import TelegramError

log = logging.getLogger(__name__)

MAX_LOOKUPS = 10  # ids asked about in one call; the rest stay bare ids
LOOKUP_TIMEOUT = 5.0  # seconds for one getChat
NAME_TTL = 600.0  # seconds a name (or a failed look-up) is kept
MAX_CACHED = 1000


def display_name(chat: ChatFullInfo) -> str | None:
    """A person's name and @username, or a group's title; None when Telegram gave neither."""
    name = chat.title or " ".join(p for p in (chat.first_name, chat.last_name) if p)
    if chat.username:
        name = f"{name} @{chat.username}" if name else f"@{chat.username}"
    return name or None


class Names:
    """Display names of Telegram user and chat ids, looked up on demand and cached briefly."""

    def __init__(self, *, ttl: float = NAME_TTL, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._cache: OrderedDict[int, tuple[float, str | None]] = OrderedDict()

    async def of(self, bot: Bot, ids: Sequence[int]) -> dict[int, str]:
        """The names known for `ids` (the first MAX_LOOKUPS distinct ones); others are absent."""
        wanted = list(dict.fromkeys(ids))[:MAX_LOOKUPS]
        now = time.monotonic()
        names: dict[int, str] = {}
        missing: list[int] = []
        for chat_id in wanted:
            cached = self._cache.get(chat_id)
            if cached is not None and now - cached[0] < self.ttl:
                if cached[1] is not None:
                    names[chat_id] = cached[1]
            else:
                missing.append(chat_id)
        found = await asyncio.gather(*(self._ask(bot, chat_id) for chat_id in missing))
        for chat_id, name in zip(missing, found, strict=True):
            self._cache[chat_id] = (now, name)
            self._cache.move_to_end(chat_id)
            if name is not None:
                names[chat_id] = name
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return names

    async def _ask(self, bot: Bot, chat_id: int) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                return display_name(await bot.get_chat(chat_id))
        except (TelegramError, TimeoutError) as exc:
            log.info("no name for %s: %s", chat_id, type(exc).__name__)
        except Exception:
            # A name only decorates an id: an answer that can't be read costs just the name.
            log.exception("unreadable getChat answer for %s", chat_id)
        return None
