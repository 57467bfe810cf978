"""The store: migrations on a blank database and over an older schema; atomic turns."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage.db import ChatKey, Store, TurnRecord, utcnow
from storage.migrations import MIGRATIONS, Migration


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
    thread = await store.create_thread(ChatKey(1), "local")
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
    thread = await store.create_thread(ChatKey(5), "local")
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
        await store.record_turn(turn)
    try:
        assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(0,)]
        assert await store.fetch_all("SELECT COUNT(*) FROM messages") == [(0,)]
        turn.reply_message_ids = [10, 11]
        await store.record_turn(turn)
        turn.reply_message_ids = [12]
        await store.record_turn(turn)
        assert await store.fetch_all("SELECT COUNT(*) FROM turns") == [(2,)]
        assert await store.fetch_all("SELECT COUNT(*) FROM instructions") == [(1,)]  # stored once
    finally:
        await store.close()
