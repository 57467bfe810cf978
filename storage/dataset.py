"""What a dataset build reads from the log (bot/services/dataset.py does the curation).

Synchronous, for a worker thread: the build runs through `asyncio.to_thread`, and the log is
read with plain `sqlite3` on a read-only connection of its own, not through the store's
aiosqlite connection (one call per row across threads would be several times slower).
`DatasetSnapshot.open` holds one read transaction for the whole build: every query sees the
same consistent snapshot while the bot keeps writing.

`turns` streams: one ordered cursor over every turn joined with its messages (ORDER BY thread,
turn, message), never `fetchall` on the log; the other queries return small sets (opted-out
users, excluded turns, turns with negative reactions, conversation ids) or one turn's rows.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from bot.domain import ImageInfo, LoggedTurn

_TURNS_SQL = """
SELECT t.id, t.thread_id, t.user_id,
       CASE WHEN t.status = 'ok' AND t.error_kind = 'length' THEN 'cut' ELSE t.status END,
       t.instructions_id,
       EXISTS (SELECT 1 FROM turn_images ti WHERE ti.turn_id = t.id),
       m.role, m.content, m.sentiment_label, t.input_kind = 'voice'
FROM turns t LEFT JOIN messages m ON m.turn_id = t.id
WHERE (:since IS NULL OR +t.started_at >= :since)
  AND (:chat_id IS NULL OR +t.chat_id = :chat_id)
ORDER BY t.thread_id, t.id, m.id
"""  # the unary + keeps the planner on turns_thread, which already gives the order: no sort

# Written by /forget (dataset_exclusions, migration 9; the forget generation).
_EXCLUSIONS_SQL = "SELECT turn_id, reason FROM dataset_exclusions"
# The conversations the test split is drawn from (with the same filters as the examples).
_HELD_FROM = """FROM turns WHERE thread_id IS NOT NULL
  AND (:since IS NULL OR started_at >= :since) AND (:chat_id IS NULL OR chat_id = :chat_id)"""
# The conversations earlier jobs kept as their test splits (storage/evals.py, migration 11).
# A failed or cancelled job has no candidate.
_EARLIER_TEST_SQL = """SELECT DISTINCT t.thread_id FROM eval_item_turns it
  JOIN eval_items i ON i.id = it.item_id JOIN fine_tune_jobs j ON j.job_id = i.job_id
  JOIN turns t ON t.id = it.turn_id
  WHERE t.thread_id IS NOT NULL AND j.status NOT IN ('failed', 'cancelled')"""
_GENERATION_SQL = "SELECT value FROM bot_settings WHERE key = 'forget_generation'"


def _uri(path: Path) -> str:
    return Path(path).resolve().as_uri() + "?mode=ro"


class DatasetSource:
    """The store's part for dataset builds (`store.dataset`): snapshots of the same database.

    Its methods are synchronous, for the build's worker thread.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    def forget_generation(self) -> str | None:
        """How many times /forget ran (a bot setting it bumps), read outside any snapshot."""
        conn = sqlite3.connect(_uri(self._path), uri=True)
        try:
            row = conn.execute(_GENERATION_SQL).fetchone()
        finally:
            conn.close()
        return str(row[0]) if row else None

    def snapshot(self) -> AbstractContextManager[DatasetSnapshot]:
        """One consistent, read-only view of the log, for a `with` block."""
        return DatasetSnapshot.open(self._path)


class DatasetSnapshot:
    """One consistent, read-only view of the log at `path` (see the module's docstring)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    @contextmanager
    def open(cls, path: Path) -> Iterator[DatasetSnapshot]:
        """The snapshot, for a `with` block: one read transaction from start to end."""
        conn = sqlite3.connect(_uri(path), uri=True, isolation_level=None)
        try:
            conn.execute("BEGIN")  # one snapshot for every query below
            yield cls(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def turns(self, since: str | None, chat_id: int | None) -> Iterator[LoggedTurn]:
        """Every turn started at/after `since` (stored-time text) in `chat_id` (None: all),
        ordered by conversation (threadless turns first), then turn, with its messages."""
        cur = self._conn.execute(_TURNS_SQL, {"since": since, "chat_id": chat_id})
        cur.arraysize = 512
        turn: LoggedTurn | None = None
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
                    tid, thread_id, user_id, status, instr_id, bool(has_images), voice=bool(voice)
                )
            if role == "user":
                turn.user_text, turn.user_sentiment = content, label
            elif role == "assistant":
                turn.assistant_text = content
        if turn is not None:
            yield turn

    def opted_out_users(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT user_id FROM opted_out_users")}

    def exclusions(self) -> dict[int, str]:
        """Turns left out of every dataset for good, with the reason (bot.domain)."""
        return dict(self._conn.execute(_EXCLUSIONS_SQL))

    def negative_turns(self) -> set[int]:
        """Turns whose reactions sum to a negative value."""
        return {
            r[0]
            for r in self._conn.execute(
                "SELECT turn_id FROM reactions GROUP BY turn_id HAVING SUM(polarity) < 0"
            )
        }

    def instructions(self, instructions_id: int | None) -> str:
        """An instructions text ("" if there is none by that id)."""
        row = self._conn.execute(
            "SELECT text FROM instructions WHERE id = ?", (instructions_id,)
        ).fetchone()
        return row[0] if row else ""

    def turn_images(self, turn_id: int) -> list[ImageInfo]:
        """One turn's images' metadata, in order."""
        rows = self._conn.execute(
            "SELECT i.sha256, i.mime_type, i.width, i.height FROM turn_images ti"
            " JOIN images i ON i.sha256 = ti.sha256 WHERE ti.turn_id = ? ORDER BY ti.position",
            (turn_id,),
        ).fetchall()  # one turn's image metadata, not the log
        return [ImageInfo(sha, mime, w, h) for sha, mime, w, h in rows]

    def image_data(self, sha256: str) -> bytes:
        """An image's bytes (empty if it is not stored)."""
        row = self._conn.execute("SELECT data FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return row[0] if row else b""

    def conversation_count(self, since: str | None, chat_id: int | None) -> int:
        """How many conversations (threads) have turns with these filters (as `turns`)."""
        params = {"since": since, "chat_id": chat_id}
        row = self._conn.execute(f"SELECT COUNT(DISTINCT thread_id) {_HELD_FROM}", params)
        return int(row.fetchone()[0])

    def recent_conversations(self, since: str | None, chat_id: int | None, k: int) -> set[int]:
        """The `k` most recently active conversations (threads) with these filters."""
        rows = self._conn.execute(
            f"SELECT thread_id {_HELD_FROM} GROUP BY thread_id ORDER BY MAX(id) DESC LIMIT :k",
            {"since": since, "chat_id": chat_id, "k": k},
        )
        return {int(row[0]) for row in rows}

    def earlier_test_conversations(self) -> set[int]:
        """The conversations earlier jobs kept as their test splits: a candidate is evaluated
        on them later, again (/eval JOB), so they stay out of every later dataset."""
        return {int(r[0]) for r in self._conn.execute(_EARLIER_TEST_SQL)}
