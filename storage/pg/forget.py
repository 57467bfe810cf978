"""/forget on PostgreSQL (storage/forget.py's twin): every word of a user's the store holds
deleted in one transaction, quotes of them redacted, and the server-side conversations that
held them queued for deletion.

SQLite has one writer, so nothing is logged while /forget's transaction runs; here other
connections (other replicas) write at the same time. The transaction therefore starts by
locking `turns` against writers (SHARE ROW EXCLUSIVE: turns in flight finish first, new ones
wait until it commits), so that it sees every turn logged before it and none half-way. Turn
ids are handed out before commit, not in commit order: the quote scan on a snapshot
beforehand reads only up to an id below which no turn was still being written (a brief SHARE
lock waits for those), and the transaction reads the rest.

Unlike SQLite with secure_delete, PostgreSQL does not overwrite what it deletes: old row
versions stay in the tables' pages until VACUUM (`PgStore.checkpoint`) frees their space, and
their bytes until new rows reuse it; the write-ahead log holds them until it is recycled."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import IsolationLevel

from bot.domain import QUOTES_FORGOTTEN, Forgotten, QuoteFinder, utcnow
from storage.forget import FORGET_GENERATION, _concerns
from storage.pg.base import Conn, PgPart

CONNECT_TIMEOUT = 10  # seconds to reach the server for the quote scan before /forget fails

_MAX_ID = "SELECT COALESCE(MAX(id), 0) FROM turns"
_USER_TEXTS = (
    "SELECT m.content FROM turns t JOIN messages m ON m.turn_id = t.id"
    " WHERE t.user_id = %s AND t.id > %s AND t.id <= %s AND m.role = 'user'"
)
_USER_CHATS = "SELECT DISTINCT chat_id FROM turns WHERE user_id = %s"
_OTHERS_MESSAGES = (
    "SELECT m.id, m.turn_id, m.content FROM turns t JOIN messages m ON m.turn_id = t.id"
    " WHERE t.chat_id = %s AND t.id > %s AND t.id <= %s AND t.user_id IS DISTINCT FROM %s"
)


class PgForgetStore(PgPart):
    """Forgetting a user, and the server-side conversations left to delete."""

    async def user(self, user_id: int, quotes: QuoteFinder) -> Forgotten:
        """Delete every word of a user's the store holds, and opt them out of datasets
        (storage.forget.ForgetStore.user). The quotes are looked for first on a snapshot,
        in a thread on a connection of its own (a big group's log takes a while); the
        transaction then only looks at turns since."""
        scan = _QuoteScan()
        conninfo = await self._conninfo()
        await asyncio.to_thread(_scan_snapshot, conninfo, user_id, quotes, scan)
        now = utcnow()
        return await self._write(lambda conn: _forget(conn, user_id, quotes, scan, now))

    async def _conninfo(self) -> str:
        """What the pool connects with (a string, or a function that gives one)."""
        conninfo = self._pool.conninfo
        if not callable(conninfo):
            return conninfo
        made = conninfo()
        return await made if inspect.isawaitable(made) else made

    async def doomed_conversations(self) -> list[str]:
        """Server-side conversations that held forgotten words and are not deleted yet."""
        return [
            str(row[0])
            for row in await self._fetch_all(
                "SELECT conversation_id FROM doomed_conversations ORDER BY created_at"
            )
        ]

    async def conversations_gone(self, conversation_ids: Sequence[str]) -> None:
        """The server confirmed these conversations deleted (or never had them)."""
        if not conversation_ids:
            return

        async def delete(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "DELETE FROM doomed_conversations WHERE conversation_id = %s",
                    [(c,) for c in conversation_ids],
                )

        await self._write(delete)


@dataclass(slots=True)
class _QuoteScan:
    """Quotes of a forgotten user found so far, and how far the log was looked at."""

    upto: int = 0  # every turn up to this id was looked at
    chats: set[int] = field(default_factory=set)  # chats whose turns up to `upto` were seen
    # message id: (its turn, its text when scanned, that text redacted)
    found: dict[int, tuple[int, str, str]] = field(default_factory=dict)


def _find(quotes: QuoteFinder, scan: _QuoteScan, rows: Iterable[tuple[Any, ...]]) -> None:
    """Keep the messages among `rows` (id, turn id, content) that quote the user."""
    for message_id, turn_id, content in rows:
        redacted = quotes.redact(content)
        if redacted is not None:
            scan.found[int(message_id)] = (int(turn_id), str(content), redacted)


def _scan_snapshot(conninfo: str, user_id: int, quotes: QuoteFinder, scan: _QuoteScan) -> None:
    """storage.forget._scan_quotes on a snapshot, in a thread: first the highest turn id
    below which no transaction is still writing (a brief SHARE lock waits for those in
    flight), then every turn up to it, read in a read-only snapshot taken after that (other
    people's messages through a server-side cursor, a chat at a time)."""
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
        with conn.transaction():
            conn.execute("LOCK TABLE turns IN SHARE MODE")
            row = conn.execute(_MAX_ID).fetchone()
            upto = int(row[0]) if row else 0
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            for (text,) in conn.execute(_USER_TEXTS, (user_id, scan.upto, upto)):
                quotes.learn(text)
            chats = {int(r[0]) for r in conn.execute(_USER_CHATS, (user_id,))}
            for chat_id in sorted(chats):
                since = scan.upto if chat_id in scan.chats else 0
                with conn.cursor(name="parley_forget_scan") as cur:
                    cur.itersize = 512
                    cur.execute(_OTHERS_MESSAGES, (chat_id, since, upto, user_id))
                    _find(quotes, scan, cur)
        scan.upto = upto
        scan.chats |= chats


async def _rows(conn: Conn, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    cur = await conn.execute(sql, params)
    return list(await cur.fetchall())


async def _scan_since(conn: Conn, user_id: int, quotes: QuoteFinder, scan: _QuoteScan) -> None:
    """storage.forget._scan_quotes inside the transaction, with `turns` locked: what was
    logged since the snapshot's scan."""
    [(upto,)] = await _rows(conn, _MAX_ID)
    for (text,) in await _rows(conn, _USER_TEXTS, (user_id, scan.upto, upto)):
        quotes.learn(text)
    chats = {int(r[0]) for r in await _rows(conn, _USER_CHATS, (user_id,))}
    for chat_id in sorted(chats):
        since = scan.upto if chat_id in scan.chats else 0
        _find(quotes, scan, await _rows(conn, _OTHERS_MESSAGES, (chat_id, since, upto, user_id)))
    scan.upto = int(upto)
    scan.chats |= chats


async def _forget(
    conn: Conn, user_id: int, quotes: QuoteFinder, scan: _QuoteScan, now: str
) -> Forgotten:
    """PgForgetStore.user's transaction (storage.forget._forget, statement for statement)."""
    await conn.execute("LOCK TABLE turns IN SHARE ROW EXCLUSIVE MODE")
    await _scan_since(conn, user_id, quotes, scan)
    # A message another /forget redacted since the snapshot is redacted again from what it
    # holds now, so that neither undoes the other's redaction.
    current = await _rows(
        conn,
        "SELECT id, content FROM messages WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
        (list(scan.found),),
    )
    redactions = []
    for message_id, content in current:
        _turn, seen, redacted = scan.found[message_id]
        text = redacted if content == seen else quotes.redact(content)
        if text is not None:
            redactions.append((text, message_id))
    quoting = sorted({turn_id for turn_id, _, _ in scan.found.values()})
    async with conn.cursor() as cur:
        await cur.executemany("UPDATE messages SET content = %s WHERE id = %s", redactions)
        await cur.executemany(
            "INSERT INTO dataset_exclusions (turn_id, reason, created_at)"
            " SELECT %s, %s, %s WHERE EXISTS (SELECT 1 FROM turns WHERE id = %s)"
            " ON CONFLICT DO NOTHING",
            [(t, QUOTES_FORGOTTEN, now, t) for t in quoting],
        )
    # Every chat thread that held their words or a quote of them.
    keys = set(
        await _rows(
            conn, "SELECT DISTINCT chat_id, topic_id FROM turns WHERE user_id = %s", (user_id,)
        )
    )
    for turn_id in quoting:
        keys.update(
            await _rows(conn, "SELECT chat_id, topic_id FROM turns WHERE id = %s", (turn_id,))
        )
    [(messages,)] = await _rows(
        conn,
        "SELECT COUNT(*) FROM messages WHERE turn_id IN (SELECT id FROM turns WHERE user_id = %s)",
        (user_id,),
    )
    await conn.execute("DELETE FROM reactions WHERE user_id = %s", (user_id,))
    await conn.execute("DELETE FROM turns WHERE user_id = %s", (user_id,))
    await conn.execute("DELETE FROM images WHERE sha256 NOT IN (SELECT sha256 FROM turn_images)")
    await conn.execute(
        "INSERT INTO opted_out_users (user_id, created_at) VALUES (%s, %s)"
        " ON CONFLICT (user_id) DO NOTHING",
        (user_id, now),
    )
    # Their server-side copies (see storage/forget.py). The rows are locked as they are read,
    # so a conversation another connection links meanwhile is the one queued for deletion.
    threads = await _rows(
        conn,
        "SELECT id, conversation_id FROM threads"
        " WHERE chat_id = %s AND conversation_id IS NOT NULL FOR UPDATE",
        (user_id,),
    )
    for chat_id, topic_id in keys:
        if chat_id != user_id:
            threads += await _rows(
                conn,
                "SELECT id, conversation_id FROM threads"
                " WHERE chat_id = %s AND topic_id = %s AND conversation_id IS NOT NULL"
                " FOR UPDATE",
                (chat_id, topic_id),
            )
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE threads SET conversation_id = NULL WHERE id = %s", [(t,) for t, _ in threads]
        )
        await cur.executemany(
            "INSERT INTO doomed_conversations (conversation_id, created_at) VALUES (%s, %s)"
            " ON CONFLICT DO NOTHING",
            [(c, now) for _, c in threads],
        )
    await conn.execute(
        "UPDATE threads SET closed_at = %s WHERE chat_id = %s AND closed_at IS NULL",
        (now, user_id),
    )
    # The inbox: every handled update loses its JSON now; quarantined ones keep theirs
    # unless they concern the user; updates not handled yet are left to be answered.
    await conn.execute(
        "UPDATE inbox SET payload = '' WHERE done_at IS NOT NULL AND payload != ''"
        " AND quarantined_at IS NULL"
    )
    held = await _rows(
        conn,
        "SELECT update_id, payload FROM inbox WHERE quarantined_at IS NOT NULL AND payload != ''",
    )
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE inbox SET payload = '' WHERE update_id = %s",
            [
                (update_id,)
                for update_id, payload in held
                if _concerns(payload, user_id) or quotes.redact(payload) is not None
            ],
        )
    await conn.execute(
        "INSERT INTO bot_settings (key, value, updated_at) VALUES (%s, '1', %s)"
        " ON CONFLICT (key) DO UPDATE SET"
        " value = (CAST(bot_settings.value AS INTEGER) + 1)::text,"
        " updated_at = excluded.updated_at",
        (FORGET_GENERATION, now),
    )
    return Forgotten(int(messages), len(quoting), len({c for _, c in threads}))
