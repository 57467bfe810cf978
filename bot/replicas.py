"""Several bot processes (replicas) serving one bot behind a load balancer, over a shared
PostgreSQL, in webhook mode.

Whichever replica Telegram's request reaches stores the update in the shared inbox with its
chat, answers 200, and offers the chat to its `Replica`. One replica at a time holds a
chat's lease (storage/pg/inbox.py) and handles that chat's pending updates one by one,
oldest first, whichever replica received them; so each chat stays in order across replicas,
and chats spread over replicas as their messages arrive. An album's parts may reach
different replicas: the lease holder waits until the album has been quiet for the album
wait (by the database's clock), then hands all its parts over as one.

Leases last `ttl` seconds and are renewed while the replica lives. Every second each replica
looks for chats with pending updates and no live lease (their replica died, or a hand-off
raced) and takes them over: a killed replica's chats resume within `ttl` and a second,
the update it was handling counted as an attempt (bot/durability.py sets aside one that
keeps failing). A replica that stops gives its leases up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from telegram import Bot, Update

from bot.concurrency import chat_key_of
from bot.domain import NO_CHAT, ChatKey, PendingUpdate
from bot.logs import LogThrottle
from bot.services.albums import Albums

log = logging.getLogger(__name__)

LEASE_TTL = 10.0  # seconds a chat's lease lasts unless renewed
SWEEP_EVERY = 1.0  # seconds between looks for chats nobody handles
BATCH = 20  # pending updates of a chat read at once (an album has at most 10)


class SharedInbox(Protocol):
    """The inbox part's replica methods (storage/pg/inbox.py)."""

    async def claim(self, chat: ChatKey, owner: str, ttl: float) -> bool: ...

    async def release(self, chat: ChatKey, owner: str) -> bool: ...

    async def holds(self, chat: ChatKey, owner: str) -> bool: ...

    async def chat_pending(self, chat: ChatKey, limit: int = ...) -> list[PendingUpdate]: ...

    async def renew(self, owner: str, ttl: float, chats: Sequence[ChatKey]) -> list[ChatKey]: ...

    async def give_up(self, chat: ChatKey, owner: str) -> None: ...

    async def orphaned(self, limit: int = ...) -> list[ChatKey]: ...

    async def release_all(self, owner: str) -> None: ...

    async def quarantine(self, update_ids: Sequence[int], reason: str) -> None: ...


Handle = Callable[[Update], Awaitable[None]]


class Replica:
    """This process's share of the chats: leases taken, renewed, given up; lanes run."""

    def __init__(
        self,
        inbox: SharedInbox,
        bot: Bot,
        handle: Handle,
        *,
        albums: Albums | None = None,
        album_wait: float = 0.0,
        before: Callable[[], Awaitable[None]] | None = None,
        tried: Callable[[int, int], None] | None = None,
        ttl: float = LEASE_TTL,
        sweep_every: float = SWEEP_EVERY,
    ) -> None:
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._inbox = inbox
        self._bot = bot
        self._handle_update = handle
        self._albums = albums
        self._album_wait = album_wait
        self._before = before  # what each update needs fresh from the database (the model)
        self._tried = tried  # tells the ledger an update's earlier attempts
        self.ttl = ttl
        self.sweep_every = sweep_every
        self._lanes: dict[ChatKey, asyncio.Task[None]] = {}
        # The chats whose lease this replica holds, and when it was last known renewed.
        self._held: dict[ChatKey, float] = {}
        self._again: set[ChatKey] = set()  # offered again while its lane was winding up
        self._stopping = False
        self._problems = LogThrottle(60.0)

    async def deliver(self, update: Update) -> None:
        """The webhook stored `update`: offer its chat (it is read back from the inbox)."""
        self.offer(chat_key_of(update) or NO_CHAT)

    def offer(self, chat: ChatKey) -> None:
        """An update of `chat` is in the inbox: handle it here unless another replica does."""
        if self._stopping:
            return
        if chat in self._lanes:
            self._again.add(chat)
            return
        task = asyncio.create_task(self._lane(chat), name=f"lane {chat}")
        self._lanes[chat] = task
        task.add_done_callback(partial(self._ended, chat))

    def _ended(self, chat: ChatKey, task: asyncio.Task[None]) -> None:
        if self._lanes.get(chat) is task:
            del self._lanes[chat]
        if chat in self._again:
            self._again.discard(chat)
            self.offer(chat)

    async def _lane(self, chat: ChatKey) -> None:
        try:
            await self._work(chat)
        except Exception as exc:
            # The database failed under the lane, say. Give the chat up (it expires anyway:
            # only chats with a lane are renewed) so that any replica takes it over.
            self._problem("a chat's lane failed", exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._inbox.give_up(chat, self.owner), self.ttl / 2)

    async def _work(self, chat: ChatKey) -> None:
        if not await self._inbox.claim(chat, self.owner, self.ttl):
            return  # another replica has it, and will see what was stored
        self._held[chat] = asyncio.get_running_loop().time()
        try:
            seen: set[int] = set()
            batch = await self._inbox.chat_pending(chat, BATCH)
            while not self._stopping:
                self._again.discard(chat)
                if batch:
                    await self._handle(chat, batch, seen)
                # Given up only if nothing of the chat waits (checked in the same statement).
                if self._stopping or await self._inbox.release(chat, self.owner):
                    return
                # Something waits, or the lease is no longer this replica's.
                if not await self._inbox.holds(chat, self.owner):
                    return  # it expired and another replica took the chat over
                self._held[chat] = asyncio.get_running_loop().time()
                batch = await self._inbox.chat_pending(chat, BATCH)
        finally:
            self._held.pop(chat, None)

    async def _handle(self, chat: ChatKey, batch: list[PendingUpdate], seen: set[int]) -> None:
        """Handle a chat's pending updates in order, until an album needs a fresh look."""
        for position, item in enumerate(batch):
            if self._stopping or not await self._still_holds(chat):
                return
            if item.update_id in seen:
                # Handled here, yet still pending: never loop on it.
                await self._inbox.quarantine(
                    [item.update_id], "handled but could not be marked done"
                )
                continue
            if item.media_group is not None:
                if position:
                    return  # read again, the album first: all its parts in one batch
                parts = [p for p in batch if p.media_group == item.media_group]
                quiet = min(p.age for p in parts)  # since its latest part arrived
                if quiet < self._album_wait:
                    await asyncio.sleep(self._album_wait - quiet)
                    return  # read again: more parts may have come
                seen.update(p.update_id for p in parts)
                await self._album(parts)
                return  # the parts handled with the first are done now
            seen.add(item.update_id)
            update = self._decode(item)
            if update is None:
                await self._inbox.quarantine([item.update_id], "stored update can't be read")
                continue
            await self._run(update, item)

    async def _still_holds(self, chat: ChatKey) -> bool:
        """Whether the chat's lease is surely still this replica's before the next update:
        renewed recently enough (see `run`), or else confirmed by the database."""
        renewed = self._held.get(chat)
        now = asyncio.get_running_loop().time()
        if renewed is not None and now - renewed < self.ttl / 2:
            return True
        if await self._inbox.holds(chat, self.owner):
            self._held[chat] = now
            return True
        return False

    async def _album(self, parts: list[PendingUpdate]) -> None:
        decoded = [(p, self._decode(p)) for p in parts]
        unreadable = [p.update_id for p, u in decoded if u is None]
        if unreadable:
            await self._inbox.quarantine(unreadable, "stored update can't be read")
        readable = [(p, u) for p, u in decoded if u is not None]
        if not readable:
            return
        (first_item, first), rest = readable[0], [u for _, u in readable[1:]]
        if self._albums is not None:
            self._albums.gather(first, rest)
        await self._run(first, first_item)

    async def _run(self, update: Update, item: PendingUpdate) -> None:
        if item.attempts and self._tried is not None:
            self._tried(item.update_id, item.attempts)
        if self._before is not None:
            await self._before()
        await self._handle_update(update)

    def _decode(self, item: PendingUpdate) -> Update | None:
        try:
            return Update.de_json(json.loads(item.payload), self._bot)
        except Exception:  # stored by another version, say
            return None

    async def run(self) -> None:
        """Renew this replica's leases, and take over chats nobody handles, until cancelled."""
        renewing = asyncio.create_task(self._renew())
        try:
            while True:
                try:
                    for chat in await self._inbox.orphaned():
                        self.offer(chat)
                except Exception as exc:  # the database is away: the next round tries again
                    self._problem("could not look for chats nobody handles", exc)
                await asyncio.sleep(self.sweep_every)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _renew(self) -> None:
        """Every third of the lease time, renew the leases of the chats with a lane here (and
        only those: a lane that died leaves its chat to expire). A lane whose lease was not
        renewed for half the lease time checks with the database before its next update."""
        loop = asyncio.get_running_loop()
        while True:
            chats = list(self._held)
            try:
                if chats:
                    began = loop.time()
                    for chat in await self._inbox.renew(self.owner, self.ttl, chats):
                        if chat in self._held:
                            self._held[chat] = began
            except Exception as exc:
                self._problem("could not renew chat leases", exc)
            await asyncio.sleep(self.ttl / 3)

    def halt(self) -> None:
        """Start no more updates (a stop began: bot/durability.py drain_updates)."""
        self._stopping = True

    async def stop(self, grace: float) -> None:
        """Start nothing more; the updates being handled get `grace` seconds to finish; then
        give every lease up, so other replicas take the chats (and what waits) now."""
        self._stopping = True
        lanes = list(self._lanes.values())
        if lanes:
            await asyncio.wait(lanes, timeout=grace)
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        with contextlib.suppress(Exception):  # the database away: the leases expire instead
            await asyncio.wait_for(self._inbox.release_all(self.owner), self.ttl / 2)

    def _problem(self, what: str, exc: BaseException) -> None:
        if count := self._problems.hit():
            log.warning("%s: %s (%d since the last such line)", what, type(exc).__name__, count)
