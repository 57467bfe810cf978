"""Albums: photos sent together (one media_group_id) arrive as separate updates; gather them.

The update processor offers every update here as it arrives, before per-chat ordering: the
first part of an album opens it and goes on to be handled; later parts join it and are not
handled on their own. The first part's turn starts once the album has been quiet for `wait`
seconds, and its handler takes all the parts.

Parts wait as Telegram messages, that is as file ids: nothing is downloaded until the album
is answered, and then within the photo service's memory budgets (bot.services.photos).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from telegram import Message, Update

MAX_PARTS = 10  # Telegram's limit for one album


@dataclass(slots=True)
class _Album:
    parts: list[Message]
    last: float
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    joined: list[int] = field(default_factory=list)  # update ids of the parts that joined


class Albums:
    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._open: dict[tuple[int, str], _Album] = {}

    @staticmethod
    def _key(message: Message) -> tuple[int, str] | None:
        return (message.chat.id, message.media_group_id) if message.media_group_id else None

    def offer(self, update: object) -> bool:
        """Register an album part; True means it joined an open album and needs no handling."""
        if not isinstance(update, Update) or update.message is None:
            return False
        key = self._key(update.message)
        if key is None:
            return False
        now = asyncio.get_running_loop().time()
        album = self._open.get(key)
        if album is not None and album.parts[0] is update.message:
            return False  # the part that opened a gathered album (`gather`): it goes on
        if album is None or album.closed.is_set() or len(album.parts) >= MAX_PARTS:
            self._open[key] = _Album([update.message], now)
            return False
        album.parts.append(update.message)
        album.joined.append(update.update_id)
        album.last = now
        return True

    def gather(self, first: Update, rest: list[Update]) -> None:
        """Open an album with every part at once, already quiet: replicas (bot/replicas.py)
        wait for the album in the shared inbox and hand it over whole. `first` then goes on
        to be handled, taking the others with it."""
        if first.message is None:
            return
        key = self._key(first.message)
        if key is None:
            return
        parts = [first.message, *(u.message for u in rest if u.message is not None)]
        now = asyncio.get_running_loop().time()
        album = _Album(parts[:MAX_PARTS], now - self.wait)
        album.joined = [u.update_id for u in rest if u.message is not None][: MAX_PARTS - 1]
        self._open[key] = album

    async def settle(self, update: object) -> None:
        """For an album's first part: wait until no part has arrived for `wait` seconds."""
        if not isinstance(update, Update) or update.message is None:
            return
        key = self._key(update.message)
        album = self._open.get(key) if key else None
        if album is None or album.parts[0] is not update.message:
            return
        loop = asyncio.get_running_loop()
        # The deadline moves each time a part arrives, so sleep until it stops moving.
        while (delay := album.last + self.wait - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        album.closed.set()

    def take(self, message: Message) -> list[Message]:
        """All parts of the album `message` opened (in arrival order), or just `message`."""
        key = self._key(message)
        album = self._open.get(key) if key else None
        if album is None or album.parts[0] is not message:
            return [message]
        return list(album.parts)

    def release(self, update: object) -> list[int]:
        """Forget the album an update opened (after its handling, taken or not).

        Returns the update ids of the parts that joined it: they were handled with it.
        """
        if isinstance(update, Update) and update.message is not None:
            key = self._key(update.message)
            album = self._open.get(key) if key else None
            if key is not None and album is not None and album.parts[0] is update.message:
                del self._open[key]
                return album.joined
        return []

    def __len__(self) -> int:
        return len(self._open)
