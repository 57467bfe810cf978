"""Update processing: chats run concurrently, each chat's updates strictly in order."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import Update
from telegram.ext import BaseUpdateProcessor

from bot.services.albums import Albums
from storage.db import ChatKey


def chat_key_of(update: object) -> ChatKey | None:
    """The thread an update belongs to: its chat, plus the forum topic if it is in one."""
    if not isinstance(update, Update) or update.effective_chat is None:
        return None
    message = update.effective_message
    topic = 0
    if message is not None and message.is_topic_message and message.message_thread_id:
        topic = message.message_thread_id
    return ChatKey(update.effective_chat.id, topic)


class _Lane:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class ChatOrderedUpdateProcessor(BaseUpdateProcessor):
    """Processes updates of different chats concurrently and each chat's in arrival order.

    PTB's processors hold a global slot while an update waits, so a per-chat lock behind
    them would let one chat with a backlog take every slot. Here PTB's own semaphore is
    made effectively unlimited; an update first queues on its chat's lane (asyncio.Lock is
    FIFO) and only then takes one of the real `max_concurrent_updates` slots. A lane
    exists only while it has updates, so memory for idle chats is not kept.
    """

    # PTB's semaphore must never make an update wait: ordering happens per chat, below.
    _UNLIMITED = 1 << 30

    def __init__(self, max_concurrent_updates: int, albums: Albums | None = None) -> None:
        super().__init__(self._UNLIMITED)
        self.albums = albums
        # Called with the ids of updates that are fully handled (the durable inbox).
        self.on_done: Callable[[list[int]], Awaitable[None]] | None = None
        self._lanes: dict[ChatKey, _Lane] = {}
        self._slots = asyncio.BoundedSemaphore(max_concurrent_updates)

    @property
    def active_lanes(self) -> int:
        return len(self._lanes)

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        if self.albums is not None and self.albums.offer(update):
            # A later album part: the album's first part handles it. Not awaited, so close it.
            if inspect.iscoroutine(coroutine):
                coroutine.close()
            return
        key = chat_key_of(update)
        if key is None:
            async with self._slots:
                await coroutine
            await self._done(update, [])
            return
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.users += 1
        handled: list[int] = []
        try:
            async with lane.lock:
                if self.albums is not None:
                    await self.albums.settle(update)
                async with self._slots:
                    await coroutine
        finally:
            if self.albums is not None:
                handled = self.albums.release(update)
            lane.users -= 1
            if lane.users == 0:
                del self._lanes[key]
        # Not reached when cancelled mid-update (shutdown): the inbox replays it next start.
        await self._done(update, handled)

    async def _done(self, update: object, also: list[int]) -> None:
        # Handled (errors included: PTB's error handler has answered): never replay it.
        # Only a crash skips this, and that is what the inbox replays.
        if self.on_done is not None and isinstance(update, Update):
            await self.on_done([update.update_id, *also])

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
