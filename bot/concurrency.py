"""Update processing: chats run concurrently, each chat's updates strictly in order."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from telegram import Update
from telegram.ext import BaseUpdateProcessor

from bot.domain import ChatKey
from bot.services.albums import Albums

log = logging.getLogger(__name__)


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


class Ledger(Protocol):
    """Where handling is accounted for (the durable inbox)."""

    def tried(self, update: object) -> int:
        """How many times handling of `update` started before (and never finished)."""

    async def begin(self, update: object) -> bool:
        """Count an attempt before handling starts; False: set aside, don't handle."""

    async def done(self, update_ids: Sequence[int]) -> None: ...

    async def set_aside(self, update_ids: Sequence[int], reason: str) -> None: ...


# Seconds a fresh start runs before suspects get their turn: a process that keeps dying
# soon after it starts (for whatever reason) must not blame what it would handle first.
SUSPECT_SETTLE = 3.0


class Isolation:
    """Suspects run alone, one at a time, the least tried first; other updates together.

    A suspect is an update whose handling started before and never finished: the process
    died (or was stopped) while it ran. Run alone, a crash during it can be blamed on it
    alone, so its attempt count means something; the least tried first, so an update that
    was merely in flight during unrelated crashes is not blamed again and again; and only
    once the process has run for `settle` seconds (see `start`), so a crash loop at
    start-up doesn't count against whatever would run first.
    """

    def __init__(self, settle: float = SUSPECT_SETTLE) -> None:
        self.settle = settle
        self._ready_at: float | None = None
        self._changed = asyncio.Condition()
        self._together = 0  # ordinary updates running
        self._alone = False  # a suspect running
        self._suspects: list[tuple[int, int]] = []  # heap of (tried, arrival) waiting
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def together(self) -> AsyncIterator[None]:
        """Run with the other ordinary updates, once no suspect waits or runs."""
        if self._alone or self._suspects:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._alone and not self._suspects)
        self._together += 1
        try:
            yield
        finally:
            self._together -= 1
            if self._together == 0 and self._suspects:
                await self._notify()

    def start(self) -> None:
        """The process has (re)started: suspects wait `settle` seconds from now."""
        self._ready_at = asyncio.get_running_loop().time() + self.settle

    @contextlib.asynccontextmanager
    async def alone(self, tried: int) -> AsyncIterator[None]:
        """Run with nothing else running; suspects tried fewer times go first."""
        if self._ready_at is not None:
            # Only the suspect's own chat waits (its lane); the others go on meanwhile.
            await asyncio.sleep(max(0.0, self._ready_at - asyncio.get_running_loop().time()))
        entry = (tried, next(self._arrivals))
        heapq.heappush(self._suspects, entry)
        try:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._suspects[0] == entry and not self._alone and not self._together
                )
        except BaseException:
            self._suspects.remove(entry)
            heapq.heapify(self._suspects)
            await self._notify()
            raise
        heapq.heappop(self._suspects)
        self._alone = True
        try:
            yield
        finally:
            self._alone = False
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class ChatOrderedUpdateProcessor(BaseUpdateProcessor):
    """Processes updates of different chats concurrently and each chat's in arrival order.

    PTB's processors hold a global slot while an update waits, so a per-chat lock behind
    them would let one chat with a backlog take every slot. Here PTB's own semaphore is
    made effectively unlimited; an update first queues on its chat's lane (asyncio.Lock is
    FIFO) and only then takes one of the real `max_concurrent_updates` slots. A lane
    exists only while it has updates, so memory for idle chats is not kept.

    With a ledger attached, each update's attempt is counted before its handling starts
    (a poison update is set aside rather than handled again), and it is marked done after;
    updates that were being handled when the process died run alone (`Isolation`).
    `drain()` (a stop signal) starts nothing more: what waits stays in the inbox.
    """

    # PTB's semaphore must never make an update wait: ordering happens per chat, below.
    _UNLIMITED = 1 << 30

    def __init__(self, max_concurrent_updates: int, albums: Albums | None = None) -> None:
        super().__init__(self._UNLIMITED)
        self.albums = albums
        # Called with the ids of updates that are fully handled (the durable inbox).
        self.on_done: Callable[[list[int]], Awaitable[None]] | None = None
        self.ledger: Ledger | None = None
        self._lanes: dict[ChatKey, _Lane] = {}
        self._slots = asyncio.BoundedSemaphore(max_concurrent_updates)
        self._draining = False
        self._waiting: set[asyncio.Task[Any]] = set()  # updates not started yet
        self._running: set[asyncio.Task[Any]] = set()  # updates being handled
        self._cut_off: asyncio.TimerHandle | None = None
        self._isolation = Isolation()

    def attach(self, ledger: Ledger) -> None:
        """Account for handling in `ledger` (attempts, quarantine, done)."""
        self.ledger = ledger
        self.on_done = ledger.done

    @property
    def active_lanes(self) -> int:
        return len(self._lanes)

    def drain(self, grace: float) -> None:
        """Start no more updates; cancel those still being handled after `grace` seconds.

        Updates not handled (waiting, or cut off) are not marked done: the inbox replays
        them at the next start.
        """
        if self._draining:
            return
        self._draining = True
        for task in list(self._waiting):
            task.cancel()
        self._cut_off = asyncio.get_running_loop().call_later(grace, self._cancel_running)

    def _cancel_running(self) -> None:
        if self._running:
            log.warning("cutting off %d update(s) still being handled", len(self._running))
        for task in list(self._running):
            task.cancel()

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        if self.albums is not None and self.albums.offer(update):
            # A later album part: the album's first part handles it. Not awaited, so close it.
            _close(coroutine)
            return
        if self._draining:
            _close(coroutine)
            return
        task = asyncio.current_task()
        assert task is not None
        key = chat_key_of(update)
        lane: _Lane | None = None
        if key is not None:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane()
            lane.users += 1
        handled: list[int] = []
        started = finished = set_aside = False
        self._waiting.add(task)
        try:
            async with lane.lock if lane is not None else contextlib.nullcontext():
                if self.albums is not None:
                    await self.albums.settle(update)
                tried = self.ledger.tried(update) if self.ledger is not None else 0
                isolation = self._isolation
                async with (
                    isolation.alone(tried) if tried else isolation.together(),
                    self._slots,
                ):
                    if self._draining:
                        pass  # left in the inbox for the next start
                    elif self.ledger is not None and not await self.ledger.begin(update):
                        set_aside = True
                    else:
                        self._waiting.discard(task)
                        self._running.add(task)
                        started = True
                        await coroutine
                        finished = True
            # The chat's next update may start; this one's lane is kept until it is recorded.
            if self.albums is not None:
                handled = self.albums.release(update)
            # Not reached when cancelled mid-update (shutdown): the inbox replays it.
            if finished:
                await self._done(update, handled)
            elif set_aside and handled and self.ledger is not None:
                await self.ledger.set_aside(handled, "part of an album that was set aside")
        finally:
            self._waiting.discard(task)
            self._running.discard(task)
            if not started:
                _close(coroutine)
            if self.albums is not None and not handled:
                self.albums.release(update)
            if lane is not None and key is not None:
                lane.users -= 1
                if lane.users == 0:
                    del self._lanes[key]

    async def _done(self, update: object, also: list[int]) -> None:
        # Handled (errors included: PTB's error handler has answered): never replay it.
        # Only a crash skips this, and that is what the inbox replays.
        if self.on_done is not None and isinstance(update, Update):
            await self.on_done([update.update_id, *also])

    async def initialize(self) -> None:
        self._isolation.start()

    async def shutdown(self) -> None:
        if self._cut_off is not None:
            self._cut_off.cancel()


def _close(coroutine: Awaitable[Any]) -> None:
    """Close a coroutine that will never be awaited (else Python warns it never was)."""
    if inspect.iscoroutine(coroutine):
        coroutine.close()
