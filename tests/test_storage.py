"""The store: migrations on a blank database and over an older schema; atomic turns; the writer;
and the parts every store has (threads, stats, settings, jobs), on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from bot.domain import (
    ChatKey,
    HistoryMessage,
    JobRecord,
    StoredImage,
    Thread,
    TurnRecord,
    utcnow,
)
from bot.errors import WriterClosed
from storage.db import Store
from storage.migrations import MIGRATIONS, Migration
from storage.pg.db import PgStore
from storage.writer import Writer
from tests.pg import AnyStore

PAST, FUTURE = "2000-01-01T00:00:00.000+00:00", "9999-01-01T00:00:00.000+00:00"


def _integrity_error(store: AnyStore) -> type[Exception]:
    """What the store's database raises for a row its constraints refuse."""
    return psycopg.IntegrityError if isinstance(store, PgStore) else sqlite3.IntegrityError


def _turn(
    thread: Thread,
    user_text: str = "hi",
    assistant_text: str | None = "hello",
    **fields: object,
) -> TurnRecord:
    turn = TurnRecord(
        thread_id=thread.id,
        key=thread.key,
        chat_type="private",
        user_id=5,
        user_message_id=None,
        user_text=user_text,
        model="m",
        instructions="be nice",
        started_at=utcnow(),
        assistant_text=assistant_text,
    )
    for name, value in fields.items():
        setattr(turn, name, value)
    return turn


async def test_blank_database_gets_every_migration(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        assert await store.schema_version() == MIGRATIONS[-1].version
        tables = {
            r[0] for r in await store.fetch_all("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"threads", "turns", "messages", "reply_messages", "instructions"} <= tables
        assert (await store.fetch_all("PRAGMA journal_mode"))[0][0] == "wal"
        assert (await store.fetch_all("PRAGMA foreign_keys"))[0][0] == 1
    finally:
        await store.close()


async def test_upgrade_applies_only_newer_migrations_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = await Store.open(path)
    thread = await store.threads.create(ChatKey(1), "local")
    extra = Migration(
        MIGRATIONS[-1].version + 1, "test column", "ALTER TABLE threads ADD COLUMN note TEXT;"
    )
    assert await store.migrate([*MIGRATIONS, extra]) == extra.version
    assert await store.fetch_all("SELECT id, note FROM threads") == [(thread.id, None)]
    await store.close()
    reopened = await Store.open(path)  # the shipped list is older than the db: nothing re-run
    try:
        assert await reopened.schema_version() == extra.version
    finally:
        await reopened.close()


async def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    before = await store.schema_version()
    bad = Migration(
        before + 1, "broken", "CREATE TABLE half (x INTEGER); INSERT INTO nowhere VALUES (1);"
    )
    with pytest.raises(sqlite3.OperationalError):
        await store.migrate([*MIGRATIONS, bad])
    try:
        assert await store.schema_version() == before
        assert await store.fetch_all("SELECT name FROM sqlite_master WHERE name = 'half'") == []
    finally:
        await store.close()


async def test_a_turn_is_written_whole_or_not_at_all(store: AnyStore) -> None:
    thread = await store.threads.create(ChatKey(5), "local")
    turn = _turn(thread, user_message_id=1, reply_message_ids=[10, 10])  # duplicate: fails
    with pytest.raises(_integrity_error(store)):
        await store.threads.record_turn(turn)
    assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(0,)]
    assert await store.fetch_all("SELECT COUNT(*) FROM messages") == [(0,)]
    turn.reply_message_ids = [10, 11]
    await store.threads.record_turn(turn)
    turn.reply_message_ids = [12]
    await store.threads.record_turn(turn)
    assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(2,)]
    assert await store.fetch_all("SELECT COUNT(*) FROM messages") == [(4,)]
    assert await store.fetch_all("SELECT COUNT(*) FROM instructions") == [(1,)]  # stored once


INPUT_KINDS = ("text", "photo", "voice", "document")
PIXEL = StoredImage("ab" * 32, "image/png", 1, 1, b"png")


async def _one_turn_of_each_kind(store: AnyStore) -> dict[int, str]:
    """A turn of each kind of input (the photo with an image): kind by turn id."""
    thread = await store.threads.create(ChatKey(5), "local")
    return {
        await store.threads.record_turn(
            _turn(thread, kind, None, input_kind=kind, images=(PIXEL,) if kind == "photo" else ())
        ): kind
        for kind in INPUT_KINDS
    }


async def test_each_turn_keeps_its_input_kind(store: AnyStore) -> None:
    ids = await _one_turn_of_each_kind(store)
    rows = await store.fetch_all("SELECT id, input_kind FROM turns")
    assert {ids[i]: kind for i, kind in rows} == {k: k for k in INPUT_KINDS}
    thread = await store.threads.current(ChatKey(5))
    assert thread is not None
    with pytest.raises(_integrity_error(store)):  # nothing else is a kind of input
        await store.threads.record_turn(_turn(thread, input_kind="sticker"))


async def test_migration_10_makes_the_turns_with_images_photos(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await _one_turn_of_each_kind(store)
    finally:
        await store.close()
    # Turns logged before migration 10 were text or photos: those with images are photos.
    sql = next(m for m in MIGRATIONS if m.version == 10).sql
    backfill = sql[sql.index("UPDATE turns") :]
    with sqlite3.connect(tmp_path / "db.sqlite3") as raw:
        raw.execute("UPDATE turns SET input_kind = 'text'")
        raw.execute(backfill)
        rows = raw.execute("SELECT input_kind FROM turns ORDER BY input_kind").fetchall()
    assert [kind for (kind,) in rows] == ["photo", "text", "text", "text"]


async def test_concurrent_writes_land_in_order_and_a_failing_one_is_undone_alone(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await store.write(lambda c: c.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
        await store.write(lambda c: c.execute("CREATE TABLE log (n INTEGER)"))

        def insert(n: int) -> Callable[[sqlite3.Connection], int]:
            def work(conn: sqlite3.Connection) -> int:
                conn.execute("INSERT INTO log VALUES (?)", (n,))  # always succeeds
                return conn.execute("INSERT INTO t VALUES (?)", (n,)).rowcount

            return work

        numbers = [*range(100), 50, *range(100, 200)]  # the second 50 must fail, alone
        results = await asyncio.gather(
            *(store.write(insert(n)) for n in numbers), return_exceptions=True
        )
        failed = [n for n, r in zip(numbers, results, strict=True) if isinstance(r, Exception)]
        assert failed == [50] and isinstance(results[100], sqlite3.IntegrityError)
        assert [r for r in results if not isinstance(r, Exception)] == [1] * 200
        rows = await store.fetch_all("SELECT n FROM t ORDER BY rowid")
        assert [r[0] for r in rows] == list(range(200))  # in the order asked for
        # The failing work's first statement went with it; everyone else's stayed.
        assert await store.fetch_all("SELECT COUNT(*), SUM(n = 50) FROM log") == [(200, 1)]
        # A cursor never leaves the writer's thread.
        assert await store.write(lambda c: c.execute("SELECT 1")) is None
    finally:
        await store.close()


async def test_a_write_whose_caller_is_cancelled_still_lands_and_close_waits_for_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    store = await Store.open(path)
    gate = threading.Event()

    def hold(conn: sqlite3.Connection) -> bool:
        gate.wait(10)
        time.sleep(0.2)  # only a close that does not wait would notice
        return True

    busy = asyncio.create_task(store.write(hold))
    setting = asyncio.create_task(store.settings.set("model", "ft:kept"))
    await asyncio.sleep(0)  # both tasks take their first step: the writes are queued
    setting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await setting
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    gate.set()
    await closing
    assert busy.done() and busy.result() is True
    with sqlite3.connect(path) as db:  # right after close: everything asked for is there
        assert db.execute("SELECT value FROM bot_settings").fetchall() == [("ft:kept",)]


async def test_an_in_memory_database_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="database file"):
        await Store.open(":memory:")


async def test_a_writer_that_cannot_open_its_database_fails_writes_instead_of_hanging(
    tmp_path: Path,
) -> None:
    writer = Writer(tmp_path)  # a directory: the thread cannot open it
    try:
        async with asyncio.timeout(10):
            with pytest.raises((WriterClosed, sqlite3.OperationalError)):
                await writer.write(lambda c: c.execute("SELECT 1"))
            with pytest.raises(WriterClosed):  # and every later write, at once
                await writer.write(lambda c: c.execute("SELECT 1"))
    finally:
        await writer.close()


# -- the parts, on either database ----------------------------------------------------------


async def test_a_chat_key_has_one_open_thread_carried_on_across_backends(store: AnyStore) -> None:
    key = ChatKey(7, topic_id=3)
    assert await store.threads.current(key) is None
    first = await store.threads.create(key, "openai", "conv_1")
    assert first == Thread(first.id, key, "openai", "conv_1")
    assert await store.threads.current(key) == first
    assert await store.threads.current(ChatKey(7)) is None  # the chat's other topic
    moved = await store.threads.create(key, "local", continues=first)
    assert moved == Thread(moved.id, key, "local", None) and moved.id != first.id
    assert await store.threads.current(key) == moved
    # The thread it carries on was closed in the same step.
    assert await store.fetch_all("SELECT COUNT(*) FROM threads WHERE closed_at IS NULL") == [(1,)]
    await store.threads.set_conversation(moved.id, "conv_2")
    assert await store.threads.current(key) == Thread(moved.id, key, "local", "conv_2")
    other = await store.threads.create(ChatKey(8), "openai", "conv_3")
    assert await store.threads.close(key) == 1
    assert await store.threads.close(key) == 0
    assert await store.threads.current(key) is None
    assert await store.threads.current(ChatKey(8)) == other  # other chats stay open
    assert await store.threads.conversation_ids(7) == ["conv_1", "conv_2"]
    with pytest.raises(_integrity_error(store)):  # no such backend
        await store.threads.create(ChatKey(9), "elsewhere")


async def test_history_keeps_the_newest_whole_turns_within_the_budget(store: AnyStore) -> None:
    key = ChatKey(5)
    old = await store.threads.create(key, "openai", "conv")
    await store.threads.record_turn(_turn(old, "u1", "a1", user_message_id=11))
    await store.threads.record_turn(_turn(old, "u2", "a2"))
    new = await store.threads.create(key, "local", continues=old)
    # 600x100 pixels: 2 x 1 tiles of 512, so 85 + 170 * 2 tokens.
    wide = StoredImage("cd" * 32, "image/jpeg", 600, 100, b"\xff\xd8jpeg")
    await store.threads.record_turn(_turn(new, "u3", "a3", images=(wide,)))
    await store.threads.record_turn(_turn(new, "u4", None, status="failed", error_kind="x"))

    everything = [
        HistoryMessage("user", "u1"),
        HistoryMessage("assistant", "a1"),
        HistoryMessage("user", "u2"),
        HistoryMessage("assistant", "a2"),
        HistoryMessage("user", "u3", (wide,)),
        HistoryMessage("assistant", "a3"),
    ]
    turn_3 = 2 + 2 + 85 + 170 * 2  # its messages' characters and its image
    assert await store.threads.history(new.id, 10_000, len) == everything
    assert await store.threads.history(new.id, turn_3 + 4, len) == everything[2:]
    assert await store.threads.history(new.id, turn_3 + 3, len) == everything[4:]  # whole turns
    assert await store.threads.history(new.id, turn_3, len) == everything[4:]
    assert await store.threads.history(new.id, turn_3 - 1, len) == []
    assert await store.threads.history(old.id, 10_000, len) == everything[:4]  # not what follows
    assert await store.threads.answered(5, 11)
    assert not await store.threads.answered(5, 12)
    assert not await store.threads.answered(6, 11)


async def test_reactions_and_the_figures_of_stats(store: AnyStore) -> None:
    thread = await store.threads.create(ChatKey(1), "local")
    await store.threads.record_turn(
        _turn(
            thread,
            user_id=5,
            input_tokens=10,
            output_tokens=20,
            reply_message_ids=[100, 101],
            user_sentiment=("positive", 0.9, "model"),
            reply_sentiment=("negative", 0.8, "model"),
        )
    )
    other = await store.threads.create(ChatKey(2), "local")
    await store.threads.record_turn(
        _turn(other, user_id=6, input_tokens=1, output_tokens=None, reply_message_ids=[100])
    )

    assert not await store.stats.set_reactions(1, 999, 5, [("👍", 1)])  # not a reply
    assert await store.stats.set_reactions(1, 100, 5, [("👍", 1), ("❤", 1)])
    assert await store.stats.reaction_counts() == {1: 2, 0: 0, -1: 0}
    assert await store.stats.set_reactions(1, 100, 5, [("👎", -1)])  # replaces the user's
    assert await store.stats.set_reactions(1, 101, 6, [("🤔", 0), ("🤔", 0)])
    assert await store.stats.reaction_counts() == {1: 0, 0: 1, -1: 1}
    assert await store.stats.reaction_counts(FUTURE) == {1: 0, 0: 0, -1: 0}
    assert await store.stats.set_reactions(1, 100, 5, [])  # all taken back
    assert await store.stats.reaction_counts(PAST) == {1: 0, 0: 1, -1: 0}

    assert await store.stats.sentiment_counts() == {
        "user": {"positive": 1, "neutral": 0, "negative": 0},
        "assistant": {"positive": 0, "neutral": 0, "negative": 1},
    }
    assert await store.stats.sentiment_counts(FUTURE) == {
        role: {"positive": 0, "neutral": 0, "negative": 0} for role in ("user", "assistant")
    }
    assert await store.stats.turns_since(5, PAST) == 1
    assert await store.stats.turns_since(5, FUTURE) == 0

    by_user = await store.stats.usage("user_id", None)
    assert by_user == [(5, 30), (6, 1)]
    assert await store.stats.usage("chat_id", PAST, limit=1) == [(1, 30)]
    assert await store.stats.usage("chat_id", FUTURE) == []
    total = await store.stats.total_tokens(None)
    assert total == 31 and await store.stats.total_tokens(FUTURE) == 0
    # Plain ints whichever database sums them (a Decimal or a float would show here).
    assert {type(n) for pair in by_user for n in pair} | {type(total)} == {int}
    with pytest.raises(ValueError):
        await store.stats.usage("model", None)


async def test_settings_and_chat_profiles_are_replaced_in_place(store: AnyStore) -> None:
    assert await store.settings.get("model") is None
    await store.settings.set("model", "ft:one")
    await store.settings.set("model", "ft:two")
    await store.settings.set("canary", "on")
    assert await store.settings.get("model") == "ft:two"
    assert await store.settings.get("canary") == "on"
    assert await store.fetch_all("SELECT COUNT(*) FROM bot_settings") == [(2,)]

    assert await store.settings.chat_profile(ChatKey(1, 2)) is None
    await store.settings.set_chat_profile(ChatKey(1, 2), "terse")
    await store.settings.set_chat_profile(ChatKey(1), "chatty")
    await store.settings.set_chat_profile(ChatKey(1, 2), "formal")
    assert await store.settings.chat_profile(ChatKey(1, 2)) == "formal"
    assert await store.settings.chat_profile(ChatKey(1)) == "chatty"
    assert await store.settings.chat_profile(ChatKey(2)) is None


async def test_jobs_are_kept_updated_and_listed_newest_first(store: AnyStore) -> None:
    def job(job_id: str, created_at: str, status: str, photos: bool | None) -> JobRecord:
        return JobRecord(
            job_id, "openai", "gpt", "file-t", None, 10, 2, 1000, 42, "d", status,
            created_at, created_at, dataset_since=PAST if photos else None,
            dataset_chat_id=-7 if photos else None, dataset_photos=photos,
        )  # fmt: skip

    older = job("ftjob-1", "2025-01-01T00:00:00.000+00:00", "succeeded", None)
    newer = job("ftjob-2", "2025-02-01T00:00:00.000+00:00", "running", True)
    unphotographed = job("ftjob-3", "2025-01-15T00:00:00.000+00:00", "queued", False)
    for record in (older, newer, unphotographed):
        await store.jobs.add(record)
    assert await store.jobs.get("ftjob-9") is None
    assert await store.jobs.get("ftjob-2") == newer
    got = await store.jobs.get("ftjob-3")
    assert got is not None and got.dataset_photos is False  # a bool again, not 0
    assert await store.jobs.recent() == [newer, unphotographed, older]
    assert await store.jobs.recent(limit=1) == [newer]
    assert await store.jobs.recent(unfinished=True) == [newer, unphotographed]
    with pytest.raises(_integrity_error(store)):  # one record per job
        await store.jobs.add(older)

    await store.jobs.update("ftjob-2", "failed", None, "out of budget")
    await store.jobs.mark_notified("ftjob-2", "running", notice_message_id=55)
    await store.jobs.mark_notified("ftjob-2", "failed")  # keeps the message it edits
    updated = await store.jobs.get("ftjob-2")
    assert updated is not None
    assert (updated.status, updated.error, updated.notified_status, updated.notice_message_id) == (
        "failed",
        "out of budget",
        "failed",
        55,
    )
    assert updated.updated_at > newer.updated_at
    assert await store.jobs.recent(unfinished=True) == [unphotographed]
