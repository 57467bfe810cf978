"""Updates are made durable before Telegram is told they arrived, and replayed after a crash.

With long polling, Telegram forgets an update once the next getUpdates asks for a later
offset. PTB makes that call right after queueing what it got, so `DurableBot.get_updates`
writes every update to the inbox before returning it. The update processor marks an
update done once handled; at start-up, whatever is not done is queued again. An update
Telegram delivers twice (a crash before the confirming call) is recognised and dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from telegram import Update
from telegram.ext import ExtBot

from storage.db import Store

log = logging.getLogger(__name__)


class Inbox:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def accept(self, updates: Sequence[Update]) -> list[Update]:
        """Persist `updates`; returns those not received before, in order."""
        rows = [(u.update_id, json.dumps(u.to_dict(), ensure_ascii=False)) for u in updates]
        fresh = await self.store.inbox_accept(rows)
        if len(fresh) < len(updates):
            log.info("dropped %d update(s) Telegram delivered again", len(updates) - len(fresh))
        return [u for u in updates if u.update_id in fresh]

    async def done(self, update_ids: Sequence[int]) -> None:
        await self.store.inbox_done(update_ids)

    async def replay(self, bot: ExtBot[Any]) -> list[Update]:
        """The updates a crash left unhandled, ready to be queued again; purges old ones."""
        await self.store.inbox_purge(
            (datetime.now(UTC) - timedelta(days=2)).isoformat(timespec="milliseconds")
        )
        updates = []
        for _, payload in await self.store.inbox_pending():
            update = Update.de_json(json.loads(payload), bot)
            if update is not None:
                updates.append(update)
        if updates:
            log.warning("replaying %d update(s) left unhandled by the last run", len(updates))
        return updates


class InboxSlot:
    """Where the inbox goes once the database is open (PTB freezes the bot after __init__)."""

    inbox: Inbox | None = None


class DurableBot(ExtBot[None]):
    """ExtBot whose get_updates persists what it returns before anything can confirm it."""

    __slots__ = ("_slot",)

    def __init__(self, *args: Any, slot: InboxSlot, **kwargs: Any) -> None:
        self._slot = slot  # before super().__init__, which freezes the object
        super().__init__(*args, **kwargs)

    @property
    def inbox(self) -> Inbox | None:
        return self._slot.inbox

    async def get_updates(self, *args: Any, **kwargs: Any) -> tuple[Update, ...]:
        updates = await super().get_updates(*args, **kwargs)
        if self._slot.inbox is None or not updates:
            return updates
        return tuple(await self._slot.inbox.accept(updates))
