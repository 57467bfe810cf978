"""What only PostgreSQL's store must do: several replicas share one database, so opening it
and opening a chat's thread may happen in two processes at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from bot.domain import ChatKey, Lane, Thread, TurnRecord, utcnow
from storage.migrations import Migration
from storage.pg.db import PgStore
from storage.pg.migrations import PG_MIGRATIONS
from tests.pg import pg_url  # noqa: F401  (the fixture)


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore]]:  # noqa: F811
    """Two stores, as two processes would have, on one database."""
    first = await PgStore.open(pg_url)
    try:
        second = await PgStore.open(pg_url)
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def _open_threads(store: PgStore, key: ChatKey) -> list[tuple[int, str]]:
    return [
        (int(i), str(b))
        for i, b in await store.fetch_all(
            "SELECT id, backend FROM threads"
            " WHERE chat_id = %s AND topic_id = %s AND closed_at IS NULL ORDER BY id",
            (key.chat_id, key.topic_id),
        )
    ]


async def test_replicas_opening_a_chats_thread_at_once_share_one(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    key = ChatKey(10, 4)
    made = await asyncio.gather(
        *(
            store.threads.create(key, "openai", f"conv_{n}")
            for n in range(4)
            for store in (first, second)
        )
    )
    [(open_id, _)] = await _open_threads(first, key)
    assert {t.id for t in made} == {open_id}
    # Every caller is told the conversation the shared thread really has.
    [conversation] = await first.fetch_all(
        "SELECT conversation_id FROM threads WHERE id = %s", (open_id,)
    )
    assert {t.conversation_id for t in made} == {conversation[0]}
    assert await second.threads.current(key) == made[0]


async def test_a_replica_that_loses_the_race_waits_for_the_winner_and_takes_its_thread(
    replicas: tuple[PgStore, PgStore],
    pg_url: str,  # noqa: F811
) -> None:
    first, _second = replicas
    key = ChatKey(11)
    async with await psycopg.AsyncConnection.connect(pg_url) as winner:
        # The winner has opened the chat's thread but not committed it yet.
        cur = await winner.execute(
            "INSERT INTO threads (chat_id, topic_id, backend, conversation_id, created_at)"
            " VALUES (%s, 0, 'openai', 'conv_winner', %s) RETURNING id",
            (key.chat_id, utcnow()),
        )
        row = await cur.fetchone()
        assert row is not None
        loser = asyncio.create_task(first.threads.create(key, "openai", "conv_loser"))
        await asyncio.sleep(0.3)
        assert not loser.done()  # waiting to see whether the winner's row stays
        await winner.commit()
    shared = Thread(int(row[0]), key, "openai", "conv_winner")
    assert await asyncio.wait_for(loser, 10) == shared
    assert await _open_threads(first, key) == [(shared.id, "openai")]


async def test_replicas_moving_a_chat_to_another_backend_at_once_agree(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    key = ChatKey(12)
    old = await first.threads.create(key, "openai", "conv_old")
    moved = await asyncio.gather(
        first.threads.create(key, "local", continues=old),
        second.threads.create(key, "local", continues=old),
    )
    assert moved[0] == moved[1]
    assert await _open_threads(second, key) == [(moved[0].id, "local")]


async def test_replicas_logging_turns_with_new_instructions_at_once_store_them_once(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    thread = await first.threads.create(ChatKey(13), "local")

    def turn(n: int) -> TurnRecord:
        return TurnRecord(
            thread_id=thread.id,
            key=thread.key,
            chat_type="private",
            user_id=5,
            user_message_id=n,
            user_text=f"u{n}",
            model="m",
            instructions="brand new instructions",
            started_at=utcnow(),
            assistant_text=f"a{n}",
        )

    await asyncio.gather(*(s.threads.record_turn(turn(n)) for n in range(3) for s in replicas))
    assert await first.fetch_all("SELECT COUNT(*) FROM instructions") == [(1,)]
    assert await second.fetch_all(
        "SELECT COUNT(DISTINCT instructions_id), COUNT(*) FROM turns"
    ) == [(1, 6)]


async def test_replicas_starting_at_once_apply_the_schema_once(pg_url: str) -> None:  # noqa: F811
    stores = await asyncio.gather(*(PgStore.open(pg_url) for _ in range(3)))
    try:
        latest = PG_MIGRATIONS[-1].version
        assert [await s.schema_version() for s in stores] == [latest] * 3
        applied = await stores[0].fetch_all(
            "SELECT version, COUNT(*) FROM schema_migrations GROUP BY version ORDER BY version"
        )
        assert applied == [(m.version, 1) for m in PG_MIGRATIONS]
        # And it is the schema the parts need: each store can use it.
        thread = await stores[1].threads.create(ChatKey(1), "local")
        assert await stores[2].threads.current(ChatKey(1)) == thread
    finally:
        for store in stores:
            await store.close()


async def test_a_failing_migration_leaves_nothing_behind(pg_url: str) -> None:  # noqa: F811
    store = await PgStore.open(pg_url)
    try:
        before = await store.schema_version()
        bad = Migration(
            before + 1, "broken", "CREATE TABLE half (x INTEGER); INSERT INTO nowhere VALUES (1);"
        )
        with pytest.raises(psycopg.errors.UndefinedTable):
            await store.migrate([*PG_MIGRATIONS, bad])
        assert await store.schema_version() == before
        assert await store.fetch_all("SELECT to_regclass('half')") == [(None,)]
    finally:
        await store.close()


async def test_a_write_whose_caller_is_cancelled_still_lands_and_close_waits_for_it(
    pg_url: str,  # noqa: F811
) -> None:
    store = await PgStore.open(pg_url)
    # Another session holds the row's lock: the write waits on it, in flight, till released.
    async with await psycopg.AsyncConnection.connect(pg_url) as blocker:
        await blocker.execute(
            "INSERT INTO bot_settings (key, value, updated_at) VALUES ('model', 'old', 'x')"
        )
        setting = asyncio.create_task(store.settings.set("model", "ft:kept"))
        await asyncio.sleep(0.2)  # the write is under way, waiting for the lock
        setting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await setting
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.1)
        assert not closing.done()  # close waits for the write asked for
        await blocker.commit()  # the lock goes: the write lands after the blocker's row
    await closing
    async with await psycopg.AsyncConnection.connect(pg_url) as db:
        cur = await db.execute("SELECT value FROM bot_settings WHERE key = 'model'")
        assert await cur.fetchall() == [("ft:kept",)]


async def test_the_inbox_counts_attempts_sets_aside_at_the_limit_and_dedupes(
    pg_url: str,  # noqa: F811
) -> None:
    store = await PgStore.open(pg_url)
    try:
        chat = ChatKey(5)
        assert await store.inbox.accept([(1, "{}"), (2, "{}")], {1: Lane(chat)}) == {1, 2}
        assert await store.inbox.accept([(2, "{}"), (3, "{}")]) == {3}  # 2 seen before
        assert await store.inbox.begin(1, 2) == (0, False)
        assert await store.inbox.begin(1, 2) == (1, False)
        assert await store.inbox.tried() == {1: 2}
        assert await store.inbox.begin(1, 2) == (2, True)  # the limit: set aside
        assert await store.inbox.begin(1, 2) is None  # no longer pending
        assert await store.inbox.quarantined() == [
            (1, 2, "handling started 2 times and never finished")
        ]
        await store.inbox.done([2])
        assert await store.inbox.pending() == [(3, "{}")]
    finally:
        await store.close()


async def test_one_replica_at_a_time_holds_a_chat_and_gives_it_up_only_when_nothing_waits(
    replicas: tuple[PgStore, PgStore],
) -> None:
    first, second = replicas
    chat, other = ChatKey(7), ChatKey(8, 3)
    await first.inbox.accept(
        [(1, "a"), (2, "b"), (3, "c")],
        {1: Lane(chat), 2: Lane(chat, "album"), 3: Lane(other)},
    )
    assert set(await second.inbox.orphaned()) == {chat, other}
    assert await first.inbox.claim(chat, "r1", 10)
    assert await first.inbox.claim(chat, "r1", 10)  # kept
    assert not await second.inbox.claim(chat, "r2", 10)  # held by r1
    assert await second.inbox.orphaned() == [other]
    waiting = await second.inbox.chat_pending(chat)
    assert [(p.update_id, p.media_group) for p in waiting] == [(1, None), (2, "album")]
    assert all(0 <= p.age < 60 for p in waiting)
    assert not await first.inbox.release(chat, "r1")  # updates wait: r1 keeps the chat
    await first.inbox.done([1, 2])
    assert not await second.inbox.release(chat, "r2")  # not r2's to give up
    assert await first.inbox.release(chat, "r1")
    assert await second.inbox.claim(chat, "r2", 10)
    # A lease not renewed runs out: another replica may take the chat.
    assert await second.inbox.claim(other, "r2", 0.2)
    assert not await first.inbox.claim(other, "r1", 10)
    await asyncio.sleep(0.3)
    assert await first.inbox.claim(other, "r1", 10)
    # Renewed: the leases it still holds among those asked for (`other` is r1's now).
    assert await second.inbox.renew("r2", 10, [chat, other]) == [chat]
    await second.inbox.give_up(chat, "r2")  # its lane failed: anyone may take the chat
    assert await first.inbox.claim(chat, "r1", 10)
    await first.inbox.release_all("r1")
    assert await second.inbox.claim(chat, "r2", 10)
    await second.inbox.release_all("r2")
    assert await first.inbox.claim(chat, "r1", 10)
    assert await first.inbox.orphaned() == [other]  # its update waits; r1 gave it up
