"""A replica's lanes (bot/replicas.py) against a real PostgreSQL when things go wrong: the
database failing under a lane, a replica whose lease ran out while it was stalled, album
parts arriving one after another. The handlers here stand for the bot's update processing
(they mark what they handled done, as the durable inbox does)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from telegram import Bot, Update

from bot.domain import ChatKey, Lane
from bot.replicas import Replica
from storage.pg.db import PgStore
from tests.conftest import TOKEN
from tests.pg import pg_url  # noqa: F401  (the fixture)
from tests.stubs.tcp_relay import Relay
from tests.stubs.telegram_server import private_text_update

CHAT = ChatKey(7)
Handle = Callable[[Update], Awaitable[None]]


async def _accept(store: PgStore, update_id: int, group: str | None = None) -> None:
    data = private_text_update(update_id, CHAT.chat_id, update_id, f"m{update_id}")
    if group is not None:
        data["message"]["media_group_id"] = group
    await store.inbox.accept([(update_id, json.dumps(data))], {update_id: Lane(CHAT, group)})


@asynccontextmanager
async def running(*replicas: Replica) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(r.run()) for r in replicas]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in replicas:
            await replica.stop(1.0)


def _recording(
    name: str, store: PgStore, log: list[tuple[str, str, int]], seconds: float
) -> Handle:
    async def handle(update: Update) -> None:
        log.append((name, "start", update.update_id))
        await asyncio.sleep(seconds)
        log.append((name, "end", update.update_id))
        await store.inbox.done([update.update_id])

    return handle


async def test_a_chat_whose_lane_failed_with_the_database_is_taken_over(
    pg_url: str,  # noqa: F811
) -> None:
    # The database restarts between two statements of a lane: every pooled connection of
    # replica A is dead, its next reads fail and the lane dies. The chat must not stay
    # A's: its lease is given up (or, failing that, no longer renewed) and B takes it.
    name = f"lane{secrets.token_hex(3)}"
    a = await PgStore.open(f"{pg_url}&application_name={name}")
    b = await PgStore.open(pg_url)
    log: list[tuple[str, str, int]] = []
    restart = asyncio.Event()

    async def handle_a(update: Update) -> None:
        log.append(("A", "start", update.update_id))
        await a.inbox.done([update.update_id])
        if update.update_id == 1:
            await _accept(a, 2)  # the user's next message waits
            restart.set()

    real_release = a.inbox.release

    async def release(chat: ChatKey, owner: str) -> bool:
        result = await real_release(chat, owner)
        if restart.is_set():
            restart.clear()
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (name,),
                )
        return result

    a.inbox.release = release  # type: ignore[method-assign]
    bot = Bot(TOKEN)
    ra = Replica(a.inbox, bot, handle_a, ttl=1.0, sweep_every=0.1)
    rb = Replica(b.inbox, bot, _recording("B", b, log, 0), ttl=1.0, sweep_every=0.1)
    try:
        async with running(ra):
            await _accept(a, 1)
            ra.offer(CHAT)
            for _ in range(100):
                if ("A", "start", 1) in log:
                    break
                await asyncio.sleep(0.05)
            async with running(rb):  # B looks for chats nobody handles from now on
                for _ in range(200):  # up to 20 s
                    if not await b.inbox.pending() and ("B", "end", 2) in log:
                        break
                    await asyncio.sleep(0.1)
        assert ("A", "start", 1) in log and ("B", "end", 2) in log, log
        assert await b.inbox.pending() == []
    finally:
        await a.close()
        await b.close()


async def test_a_replica_whose_lease_ran_out_while_stalled_leaves_the_chat_to_its_new_owner(
    pg_url: str,  # noqa: F811
) -> None:
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await relay.start()
    netloc = (
        f"{parts.username}@127.0.0.1:{relay.port}" if parts.username else f"127.0.0.1:{relay.port}"
    )
    a = await PgStore.open(urlunsplit(parts._replace(netloc=netloc)))
    b = await PgStore.open(pg_url)
    log: list[tuple[str, str, int]] = []
    bot = Bot(TOKEN)
    ra = Replica(a.inbox, bot, _recording("A", a, log, 2.5), ttl=1.0, sweep_every=0.1)
    rb = Replica(b.inbox, bot, _recording("B", b, log, 1.0), ttl=1.0, sweep_every=0.1)
    try:
        for update_id in (1, 2, 3):
            await _accept(b, update_id)
        async with running(ra):
            ra.offer(CHAT)
            for _ in range(100):
                if ("A", "start", 1) in log:  # A is handling update 1 (2.5 s)
                    break
                await asyncio.sleep(0.05)
            async with running(rb):
                relay.stall()  # A's database traffic stalls longer than its lease
                await asyncio.sleep(1.8)
                relay.resume()
                for _ in range(150):
                    if not await b.inbox.pending():
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
        # Update 1 was being handled by A when its lease ran out: B, which can't tell a
        # stalled replica from a dead one, handles it again (README: the lease's limit).
        # What waited behind it is B's alone, in order: A, back, leaves the chat.
        starts = [(who, u) for who, event, u in log if event == "start"]
        assert [u for who, u in starts if who == "A"] == [1], log
        assert [(who, u) for who, u in starts if u != 1] == [("B", 2), ("B", 3)], log
        assert log.index(("B", "end", 2)) < log.index(("B", "start", 3)), log
    finally:
        await a.close()
        await b.close()
        await relay.stop()


async def test_an_album_is_answered_once_quiet_for_the_album_wait_since_its_latest_part(
    pg_url: str,  # noqa: F811
) -> None:
    store = await PgStore.open(pg_url)
    albums: list[list[int]] = []

    class Gather:  # what the replica hands an album to (bot.services.albums.Albums)
        def gather(self, first: Update, rest: list[Update]) -> None:
            albums.append([first.update_id, *(u.update_id for u in rest)])

    async def handle(update: Update) -> None:
        ids = next((a for a in albums if a[0] == update.update_id), [update.update_id])
        await store.inbox.done(ids)

    gather: Any = Gather()
    replica = Replica(store.inbox, Bot(TOKEN), handle, albums=gather, album_wait=1.0)
    try:
        for update_id in (1, 2, 3):  # each part well within a second of the one before
            await _accept(store, update_id, "g")
            replica.offer(CHAT)
            await asyncio.sleep(0.4)
        for _ in range(100):
            if albums:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        await replica.stop(1.0)
        await store.close()
    assert albums == [[1, 2, 3]]
