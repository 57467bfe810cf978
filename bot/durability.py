"""Updates are made durable before Telegram is told they arrived, and replayed after a crash.

With long polling, Telegram forgets an update once the next getUpdates asks for a later
offset. PTB makes that call right after queueing what it got, so `DurableBot.get_updates`
writes every update to the inbox before returning it. The update processor marks an
update done once handled; at start-up, whatever is not done is queued again. An update
Telegram delivers twice (a crash before the confirming call) is recognised and dropped.

Hostile or unlucky input must not stop the bot:

- Text UTF-8 can't carry (a lone UTF-16 surrogate, which JSON can escape) is cleaned at
  the edge, before the update is stored or handled.
- An update whose handling started `max_attempts` times without finishing (it crashed the
  bot, or hung until a stop cut it off) is set aside with its reason, its user is told
  once, and the bot moves on.
- While storage fails (disk full), updates are not taken: Telegram keeps them, polling
  backs off (exponentially, capped), users are told once that the bot is unavailable, and
  everything resumes by itself when storage works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import Application, ExtBot

from bot.addressing import mentions_bot, replies_to_bot
from bot.domain import Lane, utf8_safe
from bot.errors import StorageUnavailable, WriterClosed
from bot.texts import tr
from storage.interface import Store

log = logging.getLogger(__name__)

MAX_UPDATE_ID = 2**63 - 1  # what SQLite's INTEGER holds; Telegram's ids are far smaller
BACKOFF_FIRST = 0.5  # seconds between getUpdates while updates can't be stored, doubling...
BACKOFF_MAX = 30.0  # ... up to this
MAX_TOLD = 10_000  # chats told "unavailable" per outage, at most (memory stays bounded)


class Backoff:
    """Exponential delays, capped: first, 2 x first, ... max; reset() starts over."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_MAX) -> None:
        self.first, self.cap = first, cap
        self._next = first

    @property
    def fresh(self) -> bool:
        """No delay handed out since the last reset (the first failure in a row)."""
        return self._next == self.first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Inbox:
    """The durable inbox: what arrived, how often its handling started, what is done."""

    def __init__(self, store: Store, *, max_attempts: int = 3) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff = Backoff()
        self._told: set[int] = set()  # chats told "unavailable" during this outage
        self._tried: dict[int, int] = {}  # replayed updates whose handling started before

    @property
    def healthy(self) -> bool:
        """False while updates can't be stored."""
        return self.store.writable

    async def accept(self, updates: Sequence[Update]) -> list[Update]:
        """Persist `updates`; returns those not received before, in order, cleaned.

        Raises `StorageUnavailable` while storage fails: nothing was stored.
        """
        rows, kept, lanes = [], [], {}
        for update in updates:
            prepared = _storable(update)
            if prepared is None:
                continue
            kept.append(prepared[0])
            rows.append((prepared[0].update_id, prepared[1]))
            if (lane := lane_of(prepared[0])) is not None:
                lanes[prepared[0].update_id] = lane
        fresh = await self.store.inbox.accept(rows, lanes)
        self._told.clear()
        self.backoff.reset()
        if len(fresh) < len(rows):
            log.info("dropped %d update(s) Telegram delivered again", len(rows) - len(fresh))
        return [u for u in kept if u.update_id in fresh]

    async def refused(self, updates: Sequence[Update]) -> None:
        """Updates that couldn't be stored: tell their users, once per chat and outage."""
        log.debug("%d update(s) left with Telegram: storage is failing", len(updates))
        notices = []
        for update in updates:
            chat = update.effective_chat
            if chat is None or chat.id in self._told or len(self._told) >= MAX_TOLD:
                continue
            if update.callback_query is None and not _addressed(update):
                continue
            self._told.add(chat.id)
            notices.append(tell(update, "error.unavailable"))
        await asyncio.gather(*notices)

    async def pause(self) -> None:
        """Wait before asking Telegram again (backing off), or until storage works again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backoff.next()
        while not self.store.writable and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(0.25, deadline - loop.time()))

    def tried(self, update: object) -> int:
        """How many times handling of `update` started in earlier runs and never finished."""
        return self._tried.get(update.update_id, 0) if isinstance(update, Update) else 0

    def remember(self, update_id: int, attempts: int) -> None:
        """A pending update another process began (replicas): `tried` counts its attempts."""
        self._tried[update_id] = attempts

    async def begin(self, update: object) -> bool:
        """Count an attempt at handling `update`; False if it is set aside instead."""
        if not isinstance(update, Update):
            return True
        self._tried.pop(update.update_id, None)
        try:
            counted = await self.store.inbox.begin(update.update_id, self.max_attempts)
        except Exception as exc:  # bookkeeping must not stop the bot from answering
            log.warning(
                "could not count an attempt at update %d: %s", update.update_id, type(exc).__name__
            )
            return True
        if counted is None:
            return False  # no longer pending: handled already (by another replica, say)
        if not counted[1]:
            return True
        log.error(
            "update %d set aside: its handling started %d times and never finished",
            update.update_id,
            counted[0],
        )
        if update.effective_message is not None:
            await tell(update, "error.set_aside", always=True)
        return False

    async def set_aside(self, update_ids: Sequence[int], reason: str) -> None:
        await self.store.inbox.quarantine(update_ids, reason)

    async def done(self, update_ids: Sequence[int]) -> None:
        await self.store.inbox.done(update_ids)

    async def purge(self) -> None:
        """Forget handled updates old enough that Telegram won't deliver them again."""
        try:
            await self.store.inbox.purge(
                (datetime.now(UTC) - timedelta(days=2)).isoformat(timespec="milliseconds")
            )
        except StorageUnavailable:
            pass  # housekeeping: next time

    async def replay(self, bot: ExtBot[Any]) -> list[Update]:
        """The updates a crash left unhandled, ready to be queued again; purges old ones."""
        await self.purge()
        self._tried = await self.store.inbox.tried()
        updates, unreadable = [], []
        for update_id, payload in await self.store.inbox.pending():
            try:
                update = Update.de_json(json.loads(payload), bot)
            except Exception:  # stored by another version, say: never let it stop the start
                update = None
            if update is None:
                unreadable.append(update_id)
            else:
                updates.append(update)
        if unreadable:
            log.error("set aside %d stored update(s) that can't be read", len(unreadable))
            await self.store.inbox.quarantine(unreadable, "stored update can't be read")
        if updates:
            log.warning("replaying %d update(s) left unhandled by the last run", len(updates))
        return updates


def _storable(update: Update) -> tuple[Update, str] | None:
    """The update and its JSON as stored, with text UTF-8 can't hold cleaned; None if unfit."""
    if not 0 <= update.update_id <= MAX_UPDATE_ID:
        log.warning("dropped an update whose id is out of range")
        return None
    try:
        payload = json.dumps(update.to_dict(), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        log.warning("dropped update %d: not storable (%s)", update.update_id, type(exc).__name__)
        return None
    clean = utf8_safe(payload)
    if clean is not payload:
        # Rebuilt from the cleaned JSON: handlers see exactly what a replay would.
        rebuilt = Update.de_json(json.loads(clean), update.get_bot())
        if rebuilt is None:
            return None
        log.info("update %d: replaced text UTF-8 can't carry", update.update_id)
        return rebuilt, clean
    return update, payload


def lane_of(update: Update) -> Lane | None:
    """The chat (and album) an update is handled in order with; None if it has no chat."""
    from bot.concurrency import chat_key_of

    key = chat_key_of(update)
    if key is None:
        return None
    message = update.message
    return Lane(key, message.media_group_id if message is not None else None)


def _addressed(update: Update) -> bool:
    """A message meant for the bot (private, a command, a mention or a reply to it)."""
    message = update.message
    if message is None:
        return False
    if message.chat.type == "private" or (message.text or "").startswith("/"):
        return True
    bot = message.get_bot()
    return replies_to_bot(message, bot.id) or mentions_bot(message, bot.username, bot.id)


async def tell(update: Update, key: str, *, always: bool = False) -> None:
    """Tell the user behind `update` a catalog text, if Telegram lets us; never raises.

    A button press is answered (that ends its spinner); a message gets a reply. With
    `always`, a button press also gets the text as a message in its chat.
    """
    text = tr(update, key)
    try:
        if update.callback_query is not None:
            try:
                await update.callback_query.answer(text, show_alert=True)
            except TelegramError:
                if not always:
                    raise
            if always and update.effective_chat is not None:
                await update.get_bot().send_message(update.effective_chat.id, text)
        elif update.effective_message is not None:
            message = update.effective_message
            await message.reply_text(text, do_quote=message.chat.type != "private")
    except TelegramError as exc:
        chat = update.effective_chat
        log.warning("could not tell chat %s: %s", chat.id if chat else None, type(exc).__name__)


class InboxSlot:
    """Where the inbox goes once the database is open (PTB freezes the bot after __init__)."""

    inbox: Inbox | None = None
    # Updates below this id are stored (fresh or seen before): Telegram may forget them.
    offset: int = 0
    # Where the webhook hands a stored update on: PTB's queue, or with replicas this
    # process's share of the chats (bot/replicas.py); set once the database is open.
    deliver: Callable[[Update], Awaitable[None]] | None = None


class DurableBot(ExtBot[None]):
    """ExtBot whose get_updates persists what it returns before anything can confirm it."""

    __slots__ = ("_slot",)

    def __init__(self, *args: Any, slot: InboxSlot, **kwargs: Any) -> None:
        self._slot = slot  # before super().__init__, which freezes the object
        super().__init__(*args, **kwargs)

    @property
    def inbox(self) -> Inbox | None:
        return self._slot.inbox

    @property
    def deliver(self) -> Callable[[Update], Awaitable[None]] | None:
        return self._slot.deliver

    async def get_updates(self, *args: Any, **kwargs: Any) -> tuple[Update, ...]:
        slot = self._slot
        if slot.offset and (kwargs.get("offset") or 0) < slot.offset:
            # Updates stored but not handed on (all seen before): confirm them all the same,
            # or Telegram would send them back at once, forever.
            kwargs["offset"] = slot.offset
        updates = await super().get_updates(*args, **kwargs)
        if slot.inbox is None or not updates:
            return updates
        try:
            fresh = await slot.inbox.accept(updates)
        except Exception as exc:
            # Not confirmed: Telegram keeps them until they can be stored.
            if not isinstance(exc, StorageUnavailable | WriterClosed) and slot.inbox.backoff.fresh:
                log.error("could not store updates", exc_info=exc)
            await slot.inbox.refused(updates)
            if kwargs.get("timeout"):  # not PTB's last call on the way out: that must be quick
                await slot.inbox.pause()
            return ()
        slot.offset = max(slot.offset, updates[-1].update_id + 1)
        return tuple(fresh)


def handle_stop_signals(stop: asyncio.Event, grace: float) -> None:
    """SIGINT and SIGTERM set `stop`; from the first, the process exits within `grace`.

    Shutdown is bounded step by step (replies in flight: `drain_updates`; storage: the
    writer's close); should one still hang (a full disk, the network), it exits anyway.
    """
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            return
        stop.set()
        timer = threading.Timer(grace, _exit_now, (grace,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)


def _exit_now(grace: float) -> None:
    log.error("shutdown took longer than %.0f s: exiting now", grace)
    logging.shutdown()
    os._exit(1)


def drain_updates(app: Application[Any, Any, Any, Any, Any, Any], grace: float) -> None:
    """Start no more updates; those in flight get most of `grace`, then they are cut off.

    Updates not handled stay in the inbox for the next start.
    """
    from bot.concurrency import ChatOrderedUpdateProcessor

    services = app.bot_data.services
    if services is not None and services.replica is not None:
        services.replica.halt()  # before the processor: no lane takes a next update
    processor = app.update_processor
    if isinstance(processor, ChatOrderedUpdateProcessor):
        processor.drain(max(grace * 0.5, grace - 3.0))
