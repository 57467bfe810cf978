"""/forget's parts below the bot (issue 17): the quote rule, the inbox's housekeeping, the
store's transaction (on SQLite and on PostgreSQL), the schema upgrade, and datasets built
while someone is forgotten."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from bot.domain import ChatKey, StoredImage, Thread, TurnRecord, utcnow
from bot.services import dataset
from bot.services.dataset import DatasetOptions, build_dataset
from bot.services.forgetting import QUOTE_MARK, Quotes
from storage import forget as sqlite_forget
from storage.dataset import DatasetSource
from storage.db import Store
from storage.forget import FORGET_GENERATION
from storage.migrations import MIGRATIONS
from storage.pg import forget as pg_forget
from storage.pg.db import PgStore
from tests.pg import AnyStore, fresh_schema
from tests.stubs.telegram_server import private_text_update

FORGETTER = 100
OTHER = 101

# -- the quote rule -------------------------------------------------------------------------


def _quotes(*texts: str) -> Quotes:
    quotes = Quotes()
    for text in texts:
        quotes.learn(text)
    return quotes


def test_a_quote_is_found_whatever_its_case_spacing_and_punctuation() -> None:
    quotes = _quotes("My zebra-striped secret is the blue door at dawn.")
    assert quotes.redact("He said: MY  zebra striped SECRET, is the blue door!") == (
        f"He said: {QUOTE_MARK}!"
    )
    # Two quotes, and the words between them kept.
    assert quotes.redact("my zebra striped secret is! and then: the blue door at dawn") is None
    both = _quotes("the quick brown fox jumps over", "lazy sleeping dogs never ever lie again")
    assert both.redact(
        "A: the quick brown fox jumps over! B: lazy sleeping dogs never ever lie"
    ) == (f"A: {QUOTE_MARK}! B: {QUOTE_MARK}")


def test_short_or_common_runs_are_not_quotes() -> None:
    quotes = _quotes("i do not know what to do about extraordinarily unbelievable circumstances")
    assert quotes.redact("Honestly i do not know what to do.") is None  # 18 letters
    assert quotes.redact("extraordinarily unbelievable circumstances") is None  # 3 words
    assert quotes.redact("about extraordinarily unbelievable circumstances") == QUOTE_MARK
    assert Quotes().redact("anything at all, however long it may be") is None


def test_text_without_spaces_counts_each_character_as_a_word() -> None:
    said = "我的秘密是蓝色的门在黎明时分打开并且只有我知道这件事情的全部真相"
    quotes = _quotes(said)
    assert quotes.redact(f"他说：{said[2:28]}。") == f"他说：{QUOTE_MARK}。"
    assert quotes.redact(f"他说：{said[2:20]}。") is None  # 18 characters


# -- the inbox ------------------------------------------------------------------------------


def _sql(store: AnyStore, sql: str) -> str:
    """`sql`, written with SQLite's ? placeholders, in the store's database's."""
    return sql.replace("?", "%s") if isinstance(store, PgStore) else sql


async def _execute(store: AnyStore, sql: str, params: Sequence[object] = ()) -> None:
    """Change rows behind the store's back (what the bot does over time, at once)."""
    if isinstance(store, PgStore):
        async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
            await conn.execute(_sql(store, sql), params)
    else:
        await store.write(lambda conn: conn.execute(sql, params))


def _payload(update_id: int, user_id: int, text: str, **message: Any) -> str:
    update = private_text_update(update_id, user_id, update_id, text)
    update["message"].update(message)
    return json.dumps(update, ensure_ascii=False)


async def _payloads(store: AnyStore) -> dict[int, str]:
    return {
        int(u): str(p) for u, p in await store.fetch_all("SELECT update_id, payload FROM inbox")
    }


async def _age(store: AnyStore, column: str, update_id: int, age: timedelta) -> None:
    moment = (datetime.now(UTC) - age).isoformat(timespec="milliseconds")
    await _execute(store, f"UPDATE inbox SET {column} = ? WHERE update_id = ?", (moment, update_id))


async def test_handled_updates_lose_their_json_soon_and_their_rows_later(store: AnyStore) -> None:
    await store.inbox.accept([(u, _payload(u, OTHER, f"text {u}")) for u in (1, 2, 3, 4)])
    await store.inbox.quarantine([4], "it crashed the bot")
    await store.inbox.done([1, 2])
    assert all(await _payloads(store))  # just handled: kept for a look, for now
    for update_id in (1, 4):
        await _age(store, "done_at", update_id, timedelta(minutes=2))
    await store.inbox.done([3])
    payloads = await _payloads(store)
    assert payloads[1] == "" and payloads[2] and payloads[3]
    assert json.loads(payloads[4])["message"]["text"] == "text 4"  # quarantined: kept
    # A blanked update is still recognised when Telegram delivers it again.
    assert await store.inbox.accept([(1, _payload(1, OTHER, "text 1"))]) == set()
    # Two days after it arrived, a handled update's row goes too.
    await _age(store, "received_at", 1, timedelta(days=3))
    await store.inbox.done([])
    assert sorted(await _payloads(store)) == [2, 3, 4]


async def _plan(store: AnyStore, sql: str, params: Sequence[object]) -> str:
    """How the database would run `sql`. On PostgreSQL, with sequential scans a last resort:
    on a table this small one would win, whatever indexes there are."""
    if isinstance(store, PgStore):
        async with await psycopg.AsyncConnection.connect(store.url, autocommit=True) as conn:
            await conn.execute("SET enable_seqscan = off")
            cur = await conn.execute(f"EXPLAIN {_sql(store, sql)}", params)
            return " ".join(str(row[0]) for row in await cur.fetchall())
    return " ".join(
        str(row[-1]) for row in await store.fetch_all(f"EXPLAIN QUERY PLAN {sql}", params)
    )


async def test_the_inbox_sweep_reads_indexes_not_the_table(store: AnyStore) -> None:
    now = utcnow()
    blank = await _plan(
        store,
        "UPDATE inbox SET payload = '' WHERE done_at < ? AND payload != ''"
        " AND quarantined_at IS NULL",
        (now,),
    )
    purge = await _plan(
        store, "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < ?", (now,)
    )
    assert "inbox_payload_held" in blank and "inbox_handled" in purge


# -- the store's transaction ----------------------------------------------------------------


async def _turn(
    store: AnyStore,
    user_id: int,
    chat_id: int,
    user: str,
    answer: str,
    *,
    thread: Thread | None = None,
    images: Sequence[StoredImage] = (),
    reply_id: int | None = None,
) -> int:
    now = utcnow()
    return await store.threads.record_turn(
        TurnRecord(
            thread_id=thread.id if thread else None,
            key=thread.key if thread else ChatKey(chat_id),
            chat_type="private" if chat_id > 0 else "supergroup",
            user_id=user_id,
            user_message_id=None,
            user_text=user,
            model="m",
            instructions="be brief",
            started_at=now,
            assistant_text=answer,
            images=images,
            reply_message_ids=[reply_id] if reply_id else [],
        )
    )


async def test_forget_blanks_updates_that_concern_the_user_even_quarantined(
    store: AnyStore,
) -> None:
    forgetter = json.loads(_payload(1, FORGETTER, "mine"))["message"]
    await store.inbox.accept(
        [
            (1, _payload(1, FORGETTER, "mine")),
            (2, _payload(2, OTHER, "a reply", reply_to_message=forgetter)),
            (3, _payload(3, OTHER, "my zebra-striped secret is the blue door, they said")),
            (4, _payload(4, OTHER, "nothing to do with them")),
            (5, _payload(5, OTHER, "handled and done")),
            (6, _payload(6, FORGETTER, "not handled yet")),
        ]
    )
    await store.inbox.quarantine([1, 2, 3, 4], "it crashed the bot")
    await store.inbox.done([5])
    await _turn(store, FORGETTER, FORGETTER, "my zebra-striped secret is the blue door", "ok")
    forgotten = await store.forget.user(FORGETTER, Quotes())
    assert forgotten.messages == 2
    payloads = await _payloads(store)
    # Theirs, a reply to theirs, and a quote of theirs go; another's quarantined update stays
    # for diagnosis; every handled one loses its JSON; one not handled yet is still answered.
    assert [u for u, p in sorted(payloads.items()) if p] == [4, 6]


async def test_quotes_of_the_user_are_replaced_and_left_out_of_datasets(
    store: AnyStore, tmp_path: Path
) -> None:
    said = "the password to the cellar is swordfish and nobody else knows it"
    await _turn(store, OTHER, -5, "what is for dinner", "soup")
    await _turn(store, FORGETTER, -5, said, "noted")
    quoting = await _turn(store, OTHER, -5, "what did they say?", f"They said: {said}.")
    await _turn(store, OTHER, -6, "unrelated chat", f"{said}")  # a chat they never spoke in
    forgotten = await store.forget.user(FORGETTER, Quotes())
    assert (forgotten.messages, forgotten.quoting_turns) == (2, 1)
    texts = [str(r[0]) for r in await store.fetch_all("SELECT content FROM messages ORDER BY id")]
    assert f"They said: {QUOTE_MARK}." in texts and said in texts  # the other chat's stays
    assert await store.fetch_all("SELECT turn_id, reason FROM dataset_exclusions") == [
        (quoting, "quotes_forgotten_user")
    ]
    report = build_dataset(
        store.dataset, tmp_path / "out", DatasetOptions(min_examples=0), base_model="x"
    )
    assert report.dropped["quotes_forgotten_user"] == 1


async def test_forget_deletes_what_hangs_off_their_turns_and_dooms_their_conversations(
    store: AnyStore,
) -> None:
    said = "the password to the cellar is swordfish and nobody else knows it"
    private = await store.threads.create(ChatKey(FORGETTER), "openai", "conv_private")
    group = await store.threads.create(ChatKey(-5), "openai", "conv_group")
    topic = await store.threads.create(ChatKey(-5, 9), "openai", "conv_topic")  # quoted there
    elsewhere = await store.threads.create(ChatKey(-7), "openai", "conv_elsewhere")
    theirs = StoredImage("ab" * 32, "image/png", 8, 8, b"their photo")
    shared = StoredImage("cd" * 32, "image/png", 8, 8, b"a photo both sent")
    await _turn(store, FORGETTER, FORGETTER, "hi", "hello", thread=private, images=[theirs])
    await _turn(store, FORGETTER, -5, said, "noted", thread=group, images=[shared], reply_id=1)
    await _turn(store, OTHER, -5, "mine too", "nice", thread=group, images=[shared], reply_id=2)
    await _turn(store, OTHER, -5, "what did they say?", f"They said: {said}", thread=topic)
    await _turn(store, OTHER, -7, "unrelated", "indeed", thread=elsewhere)
    assert await store.stats.set_reactions(-5, 2, FORGETTER, [("👍", 1)])
    assert await store.stats.set_reactions(-5, 2, OTHER, [("👎", -1)])
    assert await store.stats.set_reactions(-5, 1, OTHER, [("👍", 1)])

    forgotten = await store.forget.user(FORGETTER, Quotes())
    assert (forgotten.messages, forgotten.quoting_turns, forgotten.conversations) == (4, 1, 3)
    assert set(await store.forget.doomed_conversations()) == {
        "conv_private",
        "conv_group",
        "conv_topic",
    }
    threads = {
        int(i): (c, closed is not None)
        for i, c, closed in await store.fetch_all(
            "SELECT id, conversation_id, closed_at FROM threads"
        )
    }
    # Their private chat's thread is closed; the groups' stay open, without a conversation.
    assert threads == {
        private.id: (None, True),
        group.id: (None, False),
        topic.id: (None, False),
        elsewhere.id: ("conv_elsewhere", False),
    }
    assert await store.fetch_all("SELECT sha256 FROM images") == [(shared.sha256,)]
    assert await store.fetch_all("SELECT user_id, emoji FROM reactions") == [(OTHER, "👎")]
    assert await store.fetch_all("SELECT user_id FROM opted_out_users") == [(FORGETTER,)]
    assert await store.settings.get(FORGET_GENERATION) == "1"

    await store.forget.conversations_gone(["conv_group", "conv_unknown"])
    await store.forget.conversations_gone([])
    assert set(await store.forget.doomed_conversations()) == {"conv_private", "conv_topic"}
    again = await store.forget.user(FORGETTER, Quotes())  # nothing left of theirs
    assert (again.messages, again.quoting_turns, again.conversations) == (0, 0, 0)
    assert await store.settings.get(FORGET_GENERATION) == "2"


# -- PostgreSQL: other connections write while /forget runs ----------------------------------


@pytest.fixture
async def pg_store() -> AsyncIterator[PgStore]:
    async with fresh_schema() as url:
        opened = await PgStore.open(url)
        try:
            yield opened
        finally:
            await opened.close()


async def test_a_turn_still_being_logged_when_forget_begins_is_searched_for_quotes(
    pg_store: PgStore,
) -> None:
    """Turn ids are handed out before commit: a turn with a lower id than those already
    committed may still be in flight when /forget looks at the log."""
    said = "the password to the cellar is swordfish and nobody else knows it"
    await _turn(pg_store, FORGETTER, -5, said, "noted")
    now = utcnow()
    async with await psycopg.AsyncConnection.connect(pg_store.url) as slow:
        cur = await slow.execute(
            "INSERT INTO turns (chat_id, chat_type, user_id, status, model, started_at,"
            " finished_at) VALUES (-5, 'supergroup', %s, 'ok', 'm', %s, %s) RETURNING id",
            (OTHER, now, now),
        )
        row = await cur.fetchone()
        assert row is not None
        slow_turn = int(row[0])
        await slow.execute(
            "INSERT INTO messages (turn_id, role, content, created_at)"
            " VALUES (%s, 'assistant', %s, %s)",
            (slow_turn, f"They said: {said}.", now),
        )
        later = await _turn(pg_store, OTHER, -5, "and then?", "nothing more")
        assert later > slow_turn
        forgetting = asyncio.create_task(pg_store.forget.user(FORGETTER, Quotes()))
        await asyncio.sleep(0.3)
        assert not forgetting.done()  # it waits for the turn being logged
        await slow.commit()
    forgotten = await forgetting
    assert forgotten.quoting_turns == 1
    assert await pg_store.fetch_all(
        "SELECT content FROM messages WHERE turn_id = %s", (slow_turn,)
    ) == [(f"They said: {QUOTE_MARK}.",)]
    assert await pg_store.fetch_all("SELECT turn_id FROM dataset_exclusions") == [(slow_turn,)]


async def test_two_users_forgotten_at_once_keep_each_others_redactions(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = "the password to the cellar is swordfish and nobody else knows it"
    second = "my zebra-striped secret is the blue door at dawn on every tuesday"
    await _turn(store, FORGETTER, -5, first, "noted")
    await _turn(store, OTHER, -5, second, "noted")
    quoting = await _turn(store, 102, -5, "what did they say?", f"{first}; and {second}")
    loop = asyncio.get_running_loop()
    module = pg_forget if isinstance(store, PgStore) else sqlite_forget
    scan = module._scan_snapshot

    def scan_then_the_other_is_forgotten(*args: Any) -> None:
        scan(*args)
        if args[1] == FORGETTER:  # between the first's look at the log and its transaction
            asyncio.run_coroutine_threadsafe(store.forget.user(OTHER, Quotes()), loop).result()

    monkeypatch.setattr(module, "_scan_snapshot", scan_then_the_other_is_forgotten)
    await store.forget.user(FORGETTER, Quotes())
    assert await store.fetch_all(
        _sql(store, "SELECT content FROM messages WHERE turn_id = ? AND role = 'assistant'"),
        (quoting,),
    ) == [(f"{QUOTE_MARK}; and {QUOTE_MARK}",)]


# -- the upgrade, and datasets built meanwhile ----------------------------------------------


async def test_the_upgrade_blanks_the_json_of_handled_updates(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for migration in MIGRATIONS[:8]:
            conn.executescript(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (migration.version, migration.name, utcnow()),
            )
        now = utcnow()
        conn.executemany(
            "INSERT INTO inbox (update_id, payload, received_at, done_at, quarantined_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(1, "{1}", now, now, None), (2, "{2}", now, now, now), (3, "{3}", now, None, None)],
        )
    conn.close()
    store = await Store.open(path)
    try:
        assert await _payloads(store) == {1: "", 2: "{2}", 3: "{3}"}
    finally:
        await store.close()


def test_a_dataset_built_while_someone_is_forgotten_is_built_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generations = iter(["1", "2", "2", "2"])  # a /forget commits during the first build
    builds = []

    def build(source: object, out_dir: Path, options: DatasetOptions) -> dataset.DatasetReport:
        builds.append(out_dir)
        return dataset.DatasetReport(examples=len(builds))

    class Source(DatasetSource):  # the log as the store sees it, /forget bumping meanwhile
        def forget_generation(self) -> str | None:
            return next(generations)

    monkeypatch.setattr(dataset, "_build", build)
    report = build_dataset(Source(tmp_path / "db"), tmp_path, DatasetOptions(), base_model="x")
    assert len(builds) == 2 and report.examples == 2
