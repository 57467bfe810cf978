"""The store: migrations on a blank database and over an older schema; atomic turns; the writer."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.domain import ChatKey, StoredImage, TurnRecord, utcnow
from bot.errors import WriterClosed
from storage.db import Store
from storage.migrations import MIGRATIONS, Migration
from storage.writer import Writer


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


async def test_a_turn_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    thread = await store.threads.create(ChatKey(5), "local")
    turn = TurnRecord(
        thread_id=thread.id,
        key=ChatKey(5),
        chat_type="private",
        user_id=5,
        user_message_id=1,
        user_text="hi",
        model="m",
        instructions="be nice",
        started_at=utcnow(),
        assistant_text="hello",
        reply_message_ids=[10, 10],  # duplicate id: the insert fails
    )
    with pytest.raises(sqlite3.IntegrityError):
        await store.threads.record_turn(turn)
    try:
        assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(0,)]
        assert await store.fetch_all("SELECT COUNT(*) FROM messages") == [(0,)]
        turn.reply_message_ids = [10, 11]
        await store.threads.record_turn(turn)
        turn.reply_message_ids = [12]
        await store.threads.record_turn(turn)
        assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(2,)]
        assert await store.fetch_all("SELECT COUNT(*) FROM instructions") == [(1,)]  # stored once
    finally:
        await store.close()


async def test_each_turn_keeps_its_input_kind(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    thread = await store.threads.create(ChatKey(5), "local")
    image = StoredImage("ab" * 32, "image/png", 1, 1, b"png")

    def turn(text: str, kind: str, images: tuple[StoredImage, ...] = ()) -> TurnRecord:
        return TurnRecord(
            thread_id=thread.id,
            key=ChatKey(5),
            chat_type="private",
            user_id=5,
            user_message_id=None,
            user_text=text,
            model="m",
            instructions="",
            started_at=utcnow(),
            images=images,
            input_kind=kind,
        )

    try:
        kinds = ("text", "photo", "voice", "document")
        ids = {
            await store.threads.record_turn(turn(k, k, (image,) if k == "photo" else ())): k
            for k in kinds
        }
        rows = await store.fetch_all("SELECT id, input_kind FROM turns")
        assert {ids[i]: kind for i, kind in rows} == {k: k for k in kinds}
        with pytest.raises(sqlite3.IntegrityError):  # nothing else is a kind of input
            await store.threads.record_turn(turn("?", "sticker"))
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
