"""Threads and the dialogue log in PostgreSQL: which thread a chat is in, the turns logged in
it (with their messages, images and reply message ids), and the history a model is shown.

Mirrors storage/threads.py. Several replicas share the database, so opening a chat's thread
may race another replica's: the partial unique index `threads_open` (one open thread per
chat key and backend) decides, and the loser takes the winner's thread.
"""

from __future__ import annotations

import hashlib
from typing import Any

from psycopg_pool import AsyncConnectionPool

from bot.domain import (
    ChatKey,
    HistoryMessage,
    SentimentRow,
    StoredImage,
    Thread,
    TurnRecord,
    utcnow,
)
from storage.pg.base import FAIL_FAST_TRIES, Conn, Health, PgPart, is_storage_error
from storage.threads import CostFn

# The thread, the ones it carries on (a chat moved between backends), and each of their
# successful turns' messages, newest first; a user message comes with its images' cost.
HISTORY_SQL = """
    WITH RECURSIVE chain (id) AS (
        SELECT %s::bigint
        UNION ALL
        SELECT th.parent_thread_id FROM threads th JOIN chain ON th.id = chain.id
        WHERE th.parent_thread_id IS NOT NULL
    )
    SELECT t.id, m.role, m.content,
           CASE WHEN m.role = 'user' THEN (
               SELECT COALESCE(SUM(
                   85 + 170 * ((i.width + 511) / 512) * ((i.height + 511) / 512)), 0)
               FROM turn_images ti JOIN images i ON i.sha256 = ti.sha256
               WHERE ti.turn_id = t.id)
           ELSE 0 END
    FROM turns t JOIN messages m ON m.turn_id = t.id
    WHERE t.thread_id IN (SELECT id FROM chain) AND t.status = 'ok'
    ORDER BY t.id DESC, m.id DESC
"""
HISTORY_BATCH = 64  # rows fetched at a time while walking a thread back from its newest turn


class PgThreadStore(PgPart):
    """A chat's threads, the turns logged in them, and their history."""

    def __init__(self, pool: AsyncConnectionPool[Any], health: Health) -> None:
        super().__init__(pool, health)
        self._instruction_ids: dict[str, int] = {}  # sha256 -> id, committed rows only

    async def current(self, key: ChatKey) -> Thread | None:
        """The chat key's open thread, whichever backend opened it (the newest if several)."""
        row = await self._fetch_one(
            "SELECT id, backend, conversation_id FROM threads"
            " WHERE chat_id = %s AND topic_id = %s AND closed_at IS NULL"
            " ORDER BY id DESC LIMIT 1",
            (key.chat_id, key.topic_id),
        )
        return Thread(int(row[0]), key, row[1], row[2]) if row else None

    async def create(
        self,
        key: ChatKey,
        backend: str,
        conversation_id: str | None = None,
        *,
        continues: Thread | None = None,
    ) -> Thread:
        """A new open thread; `continues`: the thread it carries on, closed in the same step.

        If another replica opened the chat's thread on this backend meanwhile, that thread
        is returned (with its own conversation): a chat has one open thread per backend.
        """

        async def insert(conn: Conn) -> Thread:
            now = utcnow()
            if continues is not None:
                await conn.execute(
                    "UPDATE threads SET closed_at = %s WHERE id = %s AND closed_at IS NULL",
                    (now, continues.id),
                )
            # Each statement sees what other transactions committed before it began, so
            # this ends as soon as no third replica closes the winner's thread in between.
            while True:
                cur = await conn.execute(
                    "INSERT INTO threads (chat_id, topic_id, backend, conversation_id,"
                    " created_at, parent_thread_id) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (chat_id, topic_id, backend) WHERE closed_at IS NULL"
                    " DO NOTHING RETURNING id",
                    (
                        key.chat_id,
                        key.topic_id,
                        backend,
                        conversation_id,
                        now,
                        continues.id if continues else None,
                    ),
                )
                row = await cur.fetchone()
                if row is not None:
                    return Thread(int(row[0]), key, backend, conversation_id)
                cur = await conn.execute(
                    "SELECT id, conversation_id FROM threads WHERE chat_id = %s"
                    " AND topic_id = %s AND backend = %s AND closed_at IS NULL",
                    (key.chat_id, key.topic_id, backend),
                )
                row = await cur.fetchone()
                if row is not None:
                    return Thread(int(row[0]), key, backend, row[1])

        return await self._write(insert)

    async def set_conversation(self, thread_id: int, conversation_id: str | None) -> None:
        """Point a thread at a new server-side conversation (None: it has none for now)."""

        async def update(conn: Conn) -> None:
            await conn.execute(
                "UPDATE threads SET conversation_id = %s WHERE id = %s",
                (conversation_id, thread_id),
            )

        await self._write(update)

    async def close(self, key: ChatKey) -> int:
        """Close every open thread of a chat key (all backends); returns how many."""
        now = utcnow()

        async def close_open(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE threads SET closed_at = %s"
                " WHERE chat_id = %s AND topic_id = %s AND closed_at IS NULL",
                (now, key.chat_id, key.topic_id),
            )
            return cur.rowcount

        return await self._write(close_open)

    async def conversation_ids(self, chat_id: int) -> list[str]:
        """Server-side conversation ids of every thread a chat ever had (open or closed)."""
        return [
            str(row[0])
            for row in await self._fetch_all(
                "SELECT conversation_id FROM threads"
                " WHERE chat_id = %s AND conversation_id IS NOT NULL ORDER BY id",
                (chat_id,),
            )
        ]

    async def _instructions_id(self, conn: Conn, text: str) -> tuple[str, int]:
        """The id of an instructions text (added if new), and its digest."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if (known := self._instruction_ids.get(digest)) is not None:
            return digest, known
        # A replica adding the same text at once: DO NOTHING waits for its commit, and the
        # SELECT (a statement of its own) then sees its row.
        await conn.execute(
            "INSERT INTO instructions (sha256, text) VALUES (%s, %s)"
            " ON CONFLICT (sha256) DO NOTHING",
            (digest, text),
        )
        cur = await conn.execute("SELECT id FROM instructions WHERE sha256 = %s", (digest,))
        row = await cur.fetchone()
        assert row is not None
        return digest, int(row[0])

    async def record_turn(self, turn: TurnRecord) -> int:
        """Write a turn, its messages, images and reply message ids in one transaction."""
        digest, instructions_id, turn_id = await self._write(
            lambda conn: self._insert_turn(conn, turn)
        )
        self._instruction_ids[digest] = instructions_id  # committed: safe to remember
        return turn_id

    async def _insert_turn(self, conn: Conn, turn: TurnRecord) -> tuple[str, int, int]:
        digest, instructions_id = await self._instructions_id(conn, turn.instructions)
        cur = await conn.execute(
            "INSERT INTO turns (thread_id, chat_id, topic_id, chat_type, user_id,"
            " user_message_id, status, error_kind, model, instructions_id, response_id,"
            " input_tokens, output_tokens, latency_ms, started_at, finished_at, input_kind,"
            " requested_model) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s, %s, %s, %s) RETURNING id",
            (
                turn.thread_id,
                turn.key.chat_id,
                turn.key.topic_id,
                turn.chat_type,
                turn.user_id,
                turn.user_message_id,
                turn.status,
                turn.error_kind,
                turn.model,
                instructions_id,
                turn.response_id,
                turn.input_tokens,
                turn.output_tokens,
                turn.latency_ms,
                turn.started_at,
                turn.finished_at,
                turn.input_kind,
                turn.requested_model,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        turn_id = int(row[0])
        rows = [(turn_id, "user", turn.user_text, turn.started_at, *_tag(turn.user_sentiment))]
        if turn.assistant_text is not None:
            rows.append(
                (
                    turn_id,
                    "assistant",
                    turn.assistant_text,
                    turn.finished_at,
                    *_tag(turn.reply_sentiment),
                )
            )
        async with conn.cursor() as many:
            await many.executemany(
                "INSERT INTO messages (turn_id, role, content, created_at, sentiment_label,"
                " sentiment_score, sentiment_source) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
            await many.executemany(
                "INSERT INTO images (sha256, mime_type, width, height, bytes, data, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
                [
                    (i.sha256, i.mime_type, i.width, i.height, len(i.data), i.data, turn.started_at)
                    for i in turn.images
                ],
            )
            await many.executemany(
                "INSERT INTO turn_images (turn_id, position, sha256) VALUES (%s, %s, %s)",
                [(turn_id, n, i.sha256) for n, i in enumerate(turn.images)],
            )
            await many.executemany(
                "INSERT INTO reply_messages (chat_id, message_id, turn_id, part)"
                " VALUES (%s, %s, %s, %s)",
                [
                    (turn.key.chat_id, mid, turn_id, i)
                    for i, mid in enumerate(turn.reply_message_ids)
                ],
            )
        if turn.excluded is not None:
            await conn.execute(
                "INSERT INTO dataset_exclusions (turn_id, reason, created_at) VALUES (%s, %s, %s)",
                (turn_id, turn.excluded, turn.finished_at),
            )
        return digest, instructions_id, turn_id

    async def history(self, thread_id: int, budget: int, cost: CostFn) -> list[HistoryMessage]:
        """The newest successful exchanges of a thread (and those it continues) within `budget`.

        Reads newest-first and stops at the budget, so a long thread is never loaded whole.
        Whole turns are kept or dropped together so a user message never loses its answer;
        a turn's images count against the budget (OpenAI's published vision cost: 85 tokens
        plus 170 per 512-px tile) and come back with its user message.
        """
        for attempt in range(FAIL_FAST_TRIES):  # as _fetch_all: a dropped pooled connection
            try:
                kept = await self._newest_within(thread_id, budget, cost)
            except Exception as exc:
                if not is_storage_error(exc) or attempt + 1 >= FAIL_FAST_TRIES:
                    raise
                continue
            images = await self._turn_images({t for t, role, _ in kept if role == "user"})
            return [
                HistoryMessage(role, content, images.get(turn_id, ()) if role == "user" else ())
                for turn_id, role, content in kept
            ]
        raise AssertionError("unreachable")

    async def _newest_within(
        self, thread_id: int, budget: int, cost: CostFn
    ) -> list[tuple[int, str, str]]:
        """(turn id, role, content) of the messages `history` keeps, oldest first."""
        kept: list[tuple[int, str, str]] = []
        spent = 0
        # A server-side cursor (it lives in a transaction): rows come in batches, and no
        # more of them are read once the budget is spent.
        async with (
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="history") as cur,
        ):
            cur.itersize = HISTORY_BATCH
            await cur.execute(HISTORY_SQL, (thread_id,))
            pending: list[tuple[int, str, str]] = []
            current_turn = None
            async for turn_id, role, content, images_cost in cur:
                if turn_id != current_turn:
                    kept.extend(pending)
                    pending, current_turn = [], turn_id
                spent += cost(content) + int(images_cost)
                if spent > budget:
                    pending = []
                    break
                pending.append((int(turn_id), role, content))
            kept.extend(pending)
        kept.reverse()
        return kept

    async def _turn_images(self, turn_ids: set[int]) -> dict[int, tuple[StoredImage, ...]]:
        if not turn_ids:
            return {}
        found: dict[int, list[StoredImage]] = {}
        for turn_id, sha, mime, width, height, data in await self._fetch_all(
            "SELECT ti.turn_id, i.sha256, i.mime_type, i.width, i.height, i.data"
            " FROM turn_images ti JOIN images i ON i.sha256 = ti.sha256"
            " WHERE ti.turn_id = ANY(%s) ORDER BY ti.turn_id, ti.position",
            (sorted(turn_ids),),
        ):
            found.setdefault(int(turn_id), []).append(
                StoredImage(sha, mime, width, height, bytes(data))
            )
        return {k: tuple(v) for k, v in found.items()}

    async def answered(self, chat_id: int, user_message_id: int) -> bool:
        """Whether a message already has a logged turn (so a replay must not answer it)."""
        row = await self._fetch_one(
            "SELECT 1 FROM turns WHERE chat_id = %s AND user_message_id = %s LIMIT 1",
            (chat_id, user_message_id),
        )
        return row is not None


def _tag(sentiment: SentimentRow | None) -> SentimentRow | tuple[None, None, None]:
    return sentiment if sentiment is not None else (None, None, None)
