"""/forget leaves nothing behind that carries the user's id, in any table (issue 18).

The tables and columns are read from the database itself, so a table added later is
checked without anyone remembering to add it here.
"""

from __future__ import annotations

import re
import time
from typing import Any

from storage.db import Store
from tests.conftest import SettingsFactory, eventually, running, settled
from tests.stubs.openai_server import FakeOpenAI
from tests.stubs.telegram_server import FakeTelegram

FORGETTER = 100
OTHER = 101
GROUP = -700
# Columns that hold Telegram user ids, by the schema's naming: user_id, *_user_id, *_by.
USER_COLUMN = re.compile(r"(?:^|_)user_id$|_by$")
# The one place a forgetter's id must stay: the record that keeps them out of datasets.
OPT_OUT = ("opted_out_users", "user_id")


async def _columns(store: Store) -> dict[str, list[tuple[str, str]]]:
    """Every table's (column, declared type), from the database's own catalog."""
    tables = await store.fetch_all(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    columns = {}
    for (name,) in tables:
        info = await store.fetch_all(f'PRAGMA table_info("{name}")')
        columns[name] = [(c[1], str(c[2]).upper()) for c in info]
    return columns


async def _rows_holding(store: Store, user_id: int) -> dict[tuple[str, str], int]:
    """(table, column) -> rows whose user-id column holds `user_id`."""
    found = {}
    for table, columns in (await _columns(store)).items():
        for column, _ in columns:
            if USER_COLUMN.search(column):
                [(n,)] = await store.fetch_all(
                    f'SELECT COUNT(*) FROM "{table}" WHERE "{column}" = ?', (user_id,)
                )
                found[(table, column)] = n
    return found


async def _forget(tg: FakeTelegram, user_id: int) -> None:
    """The user sends /forget in their private chat and confirms."""
    tg.push_message(user_id, "/forget", user_id=user_id)
    await tg.wait_for(lambda: any(b[2].startswith("forget:yes:") for b in tg.buttons(user_id)))
    mid, _, data = next(b for b in tg.buttons(user_id) if b[2].startswith("forget:yes:"))
    tg.push_callback(user_id, user_id, mid, data)
    await tg.wait_for(lambda: any(t.startswith("Done: I deleted") for t in tg.texts(user_id)))


def _reaction(chat: dict[str, Any], message_id: int, user_id: int) -> dict[str, Any]:
    return {
        "message_reaction": {
            "chat": chat,
            "message_id": message_id,
            "date": int(time.time()),
            "user": {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"},
            "old_reaction": [],
            "new_reaction": [{"type": "emoji", "emoji": "👍"}],
        }
    }


async def test_forget_leaves_no_row_with_the_users_id_in_any_table(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    async with running(make_settings(sentiment_backend="lexicon")) as app:
        assert app.bot_data.services is not None
        store = app.bot_data.services.store
        tg.push_message(FORGETTER, "a private message", user_id=FORGETTER)
        await tg.wait_sent(FORGETTER, 1)
        group = tg.chat(GROUP, "supergroup")
        for n, user in enumerate((OTHER, FORGETTER), 1):
            tg.push_message(GROUP, "@parley_test_bot hi", user_id=user, chat_type="supergroup")
            await tg.wait_sent(GROUP, n)
        await settled(app)
        replies = dict(
            await store.fetch_all(
                "SELECT t.user_id, r.message_id FROM reply_messages r"
                " JOIN turns t ON t.id = r.turn_id WHERE r.chat_id = ?",
                (GROUP,),
            )
        )
        # Both react to both replies: the forgetter's reaction on the other's reply is a row
        # of theirs hanging off a turn that stays.
        for reactor in (FORGETTER, OTHER):
            for author in (FORGETTER, OTHER):
                tg.push_update(_reaction(group, replies[author], reactor))
        await eventually(lambda: _count(store, "reactions", 4))
        before = await _rows_holding(store, FORGETTER)
        # The scan sees the columns that matter, and they held the forgetter's rows.
        assert before[("turns", "user_id")] == 2 and before[("reactions", "user_id")] == 2
        assert ("fine_tune_jobs", "started_by") in before

        await _forget(tg, FORGETTER)
        await settled(app)
        after = await _rows_holding(store, FORGETTER)
        other = await _rows_holding(store, OTHER)
    assert {where: n for where, n in after.items() if n and where != OPT_OUT} == {}
    assert after[OPT_OUT] == 1
    # Only theirs went: the other user's turn stays, with their reaction on their own reply
    # (their reaction on the forgetter's reply went with that reply's turn).
    assert other[("turns", "user_id")] == 1 and other[("reactions", "user_id")] == 1


async def test_forget_leaves_none_of_the_users_words_in_any_table(
    tg: FakeTelegram, oai: FakeOpenAI, make_settings: SettingsFactory
) -> None:
    words = "my zebra-striped secret"
    async with running(make_settings()) as app:
        assert app.bot_data.services is not None
        store = app.bot_data.services.store
        tg.push_message(FORGETTER, words, user_id=FORGETTER)
        await tg.wait_sent(FORGETTER, 1)
        await _forget(tg, FORGETTER)
        await settled(app)
        found = []
        for table, columns in (await _columns(store)).items():
            for column, kind in columns:
                if kind in ("TEXT", "BLOB", ""):
                    rows = await store.fetch_all(
                        f'SELECT COUNT(*) FROM "{table}" WHERE instr("{column}", ?) > 0', (words,)
                    )
                    if rows[0][0]:
                        found.append(f"{table}.{column}")
    assert found == []


async def _count(store: Store, table: str, n: int) -> bool:
    [(count,)] = await store.fetch_all(f"SELECT COUNT(*) FROM {table}")
    return bool(count == n)
