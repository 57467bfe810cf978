"""Threads and the dialogue log: which thread a chat is in, the turns logged in it (with
their messages, images and reply message ids), and the history a model is shown."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable

import aiosqlite

from bot.domain import (
    ChatKey,
    HistoryMessage,
    SentimentRow,
    StoredImage,
    Thread,
    TurnRecord,
    utcnow,
)
from storage.base import Part
from storage.writer import Writer

CostFn = Callable[[str], int]


class ThreadStore(Part):
    """A chat's threads, the turns logged in them, and their history."""

    def __init__(self, conn: aiosqlite.Connection, writer: Writer) -> None:
        super().__init__(conn, writer)
        self._instruction_ids: dict[str, int] = {}  # sha256 -> id, committed rows only

    async def current(self, key: ChatKey) -> Thread | None:
        """The chat key's open thread, whichever backend opened it (the newest if several)."""
        rows = await self._conn.execute_fetchall(
            "SELECT id, backend, conversation_id FROM threads"
            " WHERE chat_id = ? AND topic_id = ? AND closed_at IS NULL ORDER BY id DESC LIMIT 1",
            (key.chat_id, key.topic_id),
        )
        row = next(iter(rows), None)
        return Thread(row[0], key, row[1], row[2]) if row else None

    async def create(
        self,
        key: ChatKey,
        backend: str,
        conversation_id: str | None = None,
        *,
        continues: Thread | None = None,
    ) -> Thread:
        """A new open thread; `continues`: the thread it carries on, closed in the same step."""

        def insert(conn: sqlite3.Connection) -> int | None:
            now = utcnow()
            if continues is not None:
                conn.execute(
                    "UPDATE threads SET closed_at = ? WHERE id = ? AND closed_at IS NULL",
                    (now, continues.id),
                )
            return conn.execute(
                "INSERT INTO threads (chat_id, topic_id, backend, conversation_id, created_at,"
                " parent_thread_id) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key.chat_id,
                    key.topic_id,
                    backend,
                    conversation_id,
                    now,
                    continues.id if continues else None,
                ),
            ).lastrowid

        thread_id = await self._write(insert)
        assert thread_id is not None
        return Thread(thread_id, key, backend, conversation_id)

    async def set_conversation(self, thread_id: int, conversation_id: str | None) -> None:
        """Point a thread at a new server-side conversation (None: it has none for now)."""
        await self._write(
            lambda conn: conn.execute(
                "UPDATE threads SET conversation_id = ? WHERE id = ?", (conversation_id, thread_id)
            )
        )

    async def close(self, key: ChatKey) -> int:
        """Close every open thread of a chat key (all backends); returns how many."""
        now = utcnow()
        return await self._write(
            lambda conn: (
                conn.execute(
                    "UPDATE threads SET closed_at = ?"
                    " WHERE chat_id = ? AND topic_id = ? AND closed_at IS NULL",
                    (now, key.chat_id, key.topic_id),
                ).rowcount
            )
        )

    async def conversation_ids(self, chat_id: int) -> list[str]:
        """Server-side conversation ids of every thread a chat ever had (open or closed)."""
        return [
            str(row[0])
            for row in await self._fetch_all(
                "SELECT conversation_id FROM threads"
                " WHERE chat_id = ? AND conversation_id IS NOT NULL ORDER BY id",
                (chat_id,),
            )
        ]

    def _instructions_id(self, conn: sqlite3.Connection, text: str) -> tuple[str, int]:
        """The id of an instructions text (added if new), and its digest."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        if (known := self._instruction_ids.get(digest)) is not None:
            return digest, known
        conn.execute(
            "INSERT INTO instructions (sha256, text) VALUES (?, ?) ON CONFLICT (sha256) DO NOTHING",
            (digest, text),
        )
        row = conn.execute("SELECT id FROM instructions WHERE sha256 = ?", (digest,)).fetchone()
        assert row is not None
        return digest, int(row[0])

    async def record_turn(self, turn: TurnRecord) -> int:
        """Write a turn, its messages, images and reply message ids in one transaction."""
        digest, instructions_id, turn_id = await self._write(
            lambda conn: self._insert_turn(conn, turn)
        )
        self._instruction_ids[digest] = instructions_id  # committed: safe to remember
        return turn_id

    def _insert_turn(self, conn: sqlite3.Connection, turn: TurnRecord) -> tuple[str, int, int]:
        digest, instructions_id = self._instructions_id(conn, turn.instructions)
        turn_id = conn.execute(
            "INSERT INTO turns (thread_id, chat_id, topic_id, chat_type, user_id,"
            " user_message_id, status, error_kind, model, instructions_id, response_id,"
            " input_tokens, output_tokens, latency_ms, started_at, finished_at, input_kind,"
            " requested_model) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        ).lastrowid
        assert turn_id is not None
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
        conn.executemany(
            "INSERT INTO messages (turn_id, role, content, created_at, sentiment_label,"
            " sentiment_score, sentiment_source) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO images (sha256, mime_type, width, height, bytes, data, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
            [
                (i.sha256, i.mime_type, i.width, i.height, len(i.data), i.data, turn.started_at)
                for i in turn.images
            ],
        )
        conn.executemany(
            "INSERT INTO turn_images (turn_id, position, sha256) VALUES (?, ?, ?)",
            [(turn_id, n, i.sha256) for n, i in enumerate(turn.images)],
        )
        conn.executemany(
            "INSERT INTO reply_messages (chat_id, message_id, turn_id, part) VALUES (?, ?, ?, ?)",
            [(turn.key.chat_id, mid, turn_id, i) for i, mid in enumerate(turn.reply_message_ids)],
        )
        if turn.excluded is not None:
            conn.execute(
                "INSERT INTO dataset_exclusions (turn_id, reason, created_at) VALUES (?, ?, ?)",
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
        kept: list[tuple[int, str, str]] = []
        spent = 0
        async with self._conn.execute(
            # The thread and the ones it carries on (a chat moved between backends).
            "WITH RECURSIVE chain (id) AS (SELECT ? UNION ALL SELECT th.parent_thread_id"
            "  FROM threads th JOIN chain ON th.id = chain.id"
            "  WHERE th.parent_thread_id IS NOT NULL)"
            " SELECT t.id, m.role, m.content, CASE WHEN m.role = 'user' THEN"
            "  (SELECT COALESCE(SUM("
            "    85 + 170 * ((i.width + 511) / 512) * ((i.height + 511) / 512)), 0)"
            "   FROM turn_images ti JOIN images i ON i.sha256 = ti.sha256 WHERE ti.turn_id = t.id)"
            " ELSE 0 END"
            " FROM turns t JOIN messages m ON m.turn_id = t.id"
            " WHERE t.thread_id IN (SELECT id FROM chain) AND t.status = 'ok'"
            " ORDER BY t.id DESC, m.id DESC",
            (thread_id,),
        ) as cur:
            pending: list[tuple[int, str, str]] = []
            current_turn = None
            async for turn_id, role, content, images_cost in cur:
                if turn_id != current_turn:
                    kept.extend(pending)
                    pending, current_turn = [], turn_id
                spent += cost(content) + images_cost
                if spent > budget:
                    pending = []
                    break
                pending.append((turn_id, role, content))
            kept.extend(pending)
        kept.reverse()
        images = await self._turn_images({t for t, role, _ in kept if role == "user"})
        return [
            HistoryMessage(role, content, images.get(turn_id, ()) if role == "user" else ())
            for turn_id, role, content in kept
        ]

    async def _turn_images(self, turn_ids: set[int]) -> dict[int, tuple[StoredImage, ...]]:
        if not turn_ids:
            return {}
        found: dict[int, list[StoredImage]] = {}
        marks = ",".join("?" * len(turn_ids))
        async with self._conn.execute(
            "SELECT ti.turn_id, i.sha256, i.mime_type, i.width, i.height, i.data"
            f" FROM turn_images ti JOIN images i ON i.sha256 = ti.sha256"
            f" WHERE ti.turn_id IN ({marks}) ORDER BY ti.turn_id, ti.position",
            tuple(turn_ids),
        ) as cur:
            async for turn_id, sha, mime, width, height, data in cur:
                found.setdefault(turn_id, []).append(StoredImage(sha, mime, width, height, data))
        return {k: tuple(v) for k, v in found.items()}

    async def answered(self, chat_id: int, user_message_id: int) -> bool:
        """Whether a message already has a logged turn (so a replay must not answer it)."""
        rows = await self._conn.execute_fetchall(
            "SELECT 1 FROM turns WHERE chat_id = ? AND user_message_id = ? LIMIT 1",
            (chat_id, user_message_id),
        )
        return bool(rows)


def _tag(sentiment: SentimentRow | None) -> SentimentRow | tuple[None, None, None]:
    return sentiment if sentiment is not None else (None, None, None)
