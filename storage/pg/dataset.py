"""What a dataset build reads from the log, on PostgreSQL (storage/dataset.py's twin).

Synchronous, for a worker thread: the build runs through `asyncio.to_thread`, and reads with
psycopg's sync API on a connection of its own, not the bot's pool. `PgDatasetSnapshot.open`
holds one REPEATABLE READ, READ ONLY transaction for the whole build: every query sees the
same snapshot while the bot (and other replicas) keep writing.

`turns` streams through a server-side cursor, fetched a batch at a time, never the whole log.
SQLite sorts turns without a thread first; PostgreSQL sorts NULLs last, and its index on
(thread_id, id) gives that order, so the threadless turns are read first by a query of their
own and the others then in the index's order: no sort of the whole log either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
from psycopg import IsolationLevel

from bot.domain import ImageInfo, LoggedTurn

_TURNS_SQL = """
SELECT t.id, t.thread_id, t.user_id,
       CASE WHEN t.status = 'ok' AND t.error_kind = 'length' THEN 'cut' ELSE t.status END,
       t.instructions_id,
       EXISTS (SELECT 1 FROM turn_images ti WHERE ti.turn_id = t.id),
       m.role, m.content, m.sentiment_label, t.input_kind = 'voice'
FROM turns t LEFT JOIN messages m ON m.turn_id = t.id
WHERE t.thread_id IS {threads}
  AND (%(since)s::text IS NULL OR t.started_at >= %(since)s)
  AND (%(chat_id)s::bigint IS NULL OR t.chat_id = %(chat_id)s)
ORDER BY t.thread_id, t.id, m.id
"""
# Turns without a thread first (as SQLite orders them), then the others.
_TURNS_IN_ORDER = (_TURNS_SQL.format(threads="NULL"), _TURNS_SQL.format(threads="NOT NULL"))
FETCH_ROWS = 512  # rows the server-side cursor brings per round trip
CONNECT_TIMEOUT = 10  # seconds to reach the server before the build fails

_EXCLUSIONS_SQL = "SELECT turn_id, reason FROM dataset_exclusions"
_HELD_FROM = """FROM turns WHERE thread_id IS NOT NULL
  AND (%(since)s::text IS NULL OR started_at >= %(since)s)
  AND (%(chat_id)s::bigint IS NULL OR chat_id = %(chat_id)s)"""
_EARLIER_TEST_SQL = """SELECT DISTINCT t.thread_id FROM eval_item_turns it
  JOIN eval_items i ON i.id = it.item_id JOIN fine_tune_jobs j ON j.job_id = i.job_id
  JOIN turns t ON t.id = it.turn_id
  WHERE t.thread_id IS NOT NULL AND j.status NOT IN ('failed', 'cancelled')"""
_GENERATION_SQL = "SELECT value FROM bot_settings WHERE key = 'forget_generation'"


class PgDatasetSource:
    """The store's part for dataset builds (`store.dataset`): snapshots of the database at
    `url`. Its methods are synchronous, for the build's worker thread."""

    def __init__(self, url: str) -> None:
        self._url = url

    def forget_generation(self) -> str | None:
        """How many times /forget ran (a bot setting it bumps), read outside any snapshot."""
        with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            row = conn.execute(_GENERATION_SQL).fetchone()
        return str(row[0]) if row else None

    def snapshot(self) -> AbstractContextManager[PgDatasetSnapshot]:
        """One consistent, read-only view of the log, for a `with` block."""
        return PgDatasetSnapshot.open(self._url)


class PgDatasetSnapshot:
    """One consistent, read-only view of the log (see the module's docstring)."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self._conn = conn
        self._cursors = itertools.count()

    @classmethod
    @contextmanager
    def open(cls, url: str) -> Iterator[PgDatasetSnapshot]:
        """The snapshot, for a `with` block: one read-only transaction from start to end."""
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.transaction():
                yield cls(conn)

    def _rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """A small result (a set of ids, one turn's rows): fetched at once."""
        return self._conn.execute(sql, params).fetchall()

    def turns(self, since: str | None, chat_id: int | None) -> Iterator[LoggedTurn]:
        """Every turn started at/after `since` (stored-time text) in `chat_id` (None: all),
        ordered by conversation (threadless turns first), then turn, with its messages."""
        params = {"since": since, "chat_id": chat_id}
        turn: LoggedTurn | None = None
        for sql in _TURNS_IN_ORDER:
            with self._conn.cursor(name=f"parley_turns_{next(self._cursors)}") as cur:
                cur.itersize = FETCH_ROWS
                cur.execute(sql, params)
                for (
                    tid,
                    thread_id,
                    user_id,
                    status,
                    instr_id,
                    has_images,
                    role,
                    content,
                    label,
                    voice,
                ) in cur:
                    if turn is None or turn.id != tid:
                        if turn is not None:
                            yield turn
                        turn = LoggedTurn(
                            tid, thread_id, user_id, status, instr_id, has_images, voice=voice
                        )
                    if role == "user":
                        turn.user_text, turn.user_sentiment = content, label
                    elif role == "assistant":
                        turn.assistant_text = content
        if turn is not None:
            yield turn

    def opted_out_users(self) -> set[int]:
        return {int(r[0]) for r in self._rows("SELECT user_id FROM opted_out_users")}

    def exclusions(self) -> dict[int, str]:
        """Turns left out of every dataset for good, with the reason (bot.domain)."""
        return {int(t): str(r) for t, r in self._rows(_EXCLUSIONS_SQL)}

    def negative_turns(self) -> set[int]:
        """Turns whose reactions sum to a negative value."""
        return {
            int(r[0])
            for r in self._rows(
                "SELECT turn_id FROM reactions GROUP BY turn_id HAVING SUM(polarity) < 0"
            )
        }

    def instructions(self, instructions_id: int | None) -> str:
        """An instructions text ("" if there is none by that id)."""
        rows = self._rows("SELECT text FROM instructions WHERE id = %s", (instructions_id,))
        return str(rows[0][0]) if rows else ""

    def turn_images(self, turn_id: int) -> list[ImageInfo]:
        """One turn's images' metadata, in order."""
        rows = self._rows(
            "SELECT i.sha256, i.mime_type, i.width, i.height FROM turn_images ti"
            " JOIN images i ON i.sha256 = ti.sha256 WHERE ti.turn_id = %s ORDER BY ti.position",
            (turn_id,),
        )
        return [ImageInfo(sha, mime, w, h) for sha, mime, w, h in rows]

    def image_data(self, sha256: str) -> bytes:
        """An image's bytes (empty if it is not stored)."""
        rows = self._rows("SELECT data FROM images WHERE sha256 = %s", (sha256,))
        return bytes(rows[0][0]) if rows else b""

    def conversation_count(self, since: str | None, chat_id: int | None) -> int:
        """How many conversations (threads) have turns with these filters (as `turns`)."""
        params = {"since": since, "chat_id": chat_id}
        return int(self._rows(f"SELECT COUNT(DISTINCT thread_id) {_HELD_FROM}", params)[0][0])

    def recent_conversations(self, since: str | None, chat_id: int | None, k: int) -> set[int]:
        """The `k` most recently active conversations (threads) with these filters."""
        rows = self._rows(
            f"SELECT thread_id {_HELD_FROM} GROUP BY thread_id ORDER BY MAX(id) DESC LIMIT %(k)s",
            {"since": since, "chat_id": chat_id, "k": k},
        )
        return {int(row[0]) for row in rows}

    def earlier_test_conversations(self) -> set[int]:
        """The conversations earlier jobs kept as their test splits: a candidate is evaluated
        on them later, again (/eval JOB), so they stay out of every later dataset."""
        return {int(r[0]) for r in self._rows(_EARLIER_TEST_SQL)}
