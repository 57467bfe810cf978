"""The SQLite store: explicit SQL, reads over aiosqlite, writes through one writer thread.

WAL mode, foreign keys on. Reads run on an aiosqlite connection; every write is a plain
function of a `sqlite3.Connection` run by `storage.writer.Writer` (see there for why).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from bot.domain import (
    QUOTES_FORGOTTEN,
    ChatKey,
    Forgotten,
    HistoryMessage,
    JobRecord,
    QuoteFinder,
    SentimentRow,
    StoredImage,
    Thread,
    TurnRecord,
    utcnow,
)
from storage.migrations import MIGRATIONS, Migration
from storage.writer import Writer

log = logging.getLogger(__name__)

CostFn = Callable[[str], int]
T = TypeVar("T")


# A handled update is kept only so that Telegram delivering it again is recognised (that
# happens within a day). Its JSON, message text included, is blanked this long after it
# was handled (a minute to look at what just happened); quarantined updates keep theirs
# for diagnosis. The row itself goes INBOX_KEEP after it arrived.
INBOX_PAYLOAD_KEEP = timedelta(minutes=1)
INBOX_KEEP = timedelta(days=2)

# /forget: every one bumps this bot setting in its transaction, so a dataset built from a
# snapshot taken before is known to be stale; turns that quoted the forgotten user are
# left out of datasets with this reason (QUOTES_FORGOTTEN).
FORGET_GENERATION = "forget_generation"


JOB_COLUMNS = (
    "job_id",
    "trainer",
    "base_model",
    "training_file",
    "validation_file",
    "train_examples",
    "validation_examples",
    "tokens",
    "started_by",
    "description",
    "status",
    "created_at",
    "updated_at",
    "fine_tuned_model",
    "error",
    "notified_status",
    "notice_message_id",
    "dataset_since",
    "dataset_chat_id",
    "dataset_photos",
)


class Store:
    """Async repository over the SQLite dialogue log."""

    def __init__(self, conn: aiosqlite.Connection, writer: Writer) -> None:
        self._conn = conn
        self._writer = writer
        self._instruction_ids: dict[str, int] = {}  # sha256 -> id, committed rows only

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        """Open (creating if needed) the database at `path` and apply pending migrations."""
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("the store needs a database file: its reader and writer share it")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(str(path), isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA secure_delete=ON")  # migrations write here too
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            store = cls(conn, Writer(path))
        except BaseException:
            await conn.close()
            raise
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Carry out the writes asked for, then close both connections."""
        await self._writer.close()
        await self._conn.close()

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` (plain sqlite3 calls) as one transaction of the writer's; its result."""
        return await self._writer.write(work)

    # -- migrations -------------------------------------------------------------------------

    async def schema_version(self) -> int:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        async with self._conn.execute("SELECT MAX(version) FROM schema_migrations") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def migrate(self, migrations: Iterable[Migration] = MIGRATIONS) -> int:
        """Apply every migration newer than the schema, each in its own transaction."""
        current = await self.schema_version()
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version <= current:
                continue
            log.info("applying migration %04d %s", migration.version, migration.name)
            # executescript runs statement by statement; wrap it so a failure leaves nothing.
            script = (
                "BEGIN IMMEDIATE;\n"
                + migration.sql
                + "\nINSERT INTO schema_migrations (version, name, applied_at) VALUES ("
                + f"{int(migration.version)}, '{migration.name.replace(chr(39), '')}', "
                + f"'{utcnow()}');\nCOMMIT;"
            )
            try:
                await self._conn.executescript(script)
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
            current = migration.version
        return current

    # -- threads ----------------------------------------------------------------------------

    async def current_thread(self, key: ChatKey) -> Thread | None:
        """The chat key's open thread, whichever backend opened it (the newest if several)."""
        rows = await self._conn.execute_fetchall(
            "SELECT id, backend, conversation_id FROM threads"
            " WHERE chat_id = ? AND topic_id = ? AND closed_at IS NULL ORDER BY id DESC LIMIT 1",
            (key.chat_id, key.topic_id),
        )
        row = next(iter(rows), None)
        return Thread(row[0], key, row[1], row[2]) if row else None

    async def create_thread(
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

        thread_id = await self.write(insert)
        assert thread_id is not None
        return Thread(thread_id, key, backend, conversation_id)

    async def set_conversation(self, thread_id: int, conversation_id: str | None) -> None:
        """Point a thread at a new server-side conversation (None: it has none for now)."""
        await self.write(
            lambda conn: conn.execute(
                "UPDATE threads SET conversation_id = ? WHERE id = ?", (conversation_id, thread_id)
            )
        )

    async def close_threads(self, key: ChatKey) -> int:
        """Close every open thread of a chat key (all backends); returns how many."""
        now = utcnow()
        return await self.write(
            lambda conn: (
                conn.execute(
                    "UPDATE threads SET closed_at = ?"
                    " WHERE chat_id = ? AND topic_id = ? AND closed_at IS NULL",
                    (now, key.chat_id, key.topic_id),
                ).rowcount
            )
        )

    # -- the dialogue log -------------------------------------------------------------------

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
        digest, instructions_id, turn_id = await self.write(
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

    # -- reactions and stats ----------------------------------------------------------------

    async def set_reactions(
        self, chat_id: int, message_id: int, user_id: int, reactions: Sequence[tuple[str, int]]
    ) -> bool:
        """Replace a user's reactions on a bot reply; False if the message is not a reply."""
        now = utcnow()

        def replace(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT turn_id FROM reply_messages WHERE chat_id = ? AND message_id = ?",
                (chat_id, message_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "DELETE FROM reactions WHERE chat_id = ? AND message_id = ? AND user_id = ?",
                (chat_id, message_id, user_id),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO reactions (chat_id, message_id, user_id, emoji, polarity,"
                " turn_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(chat_id, message_id, user_id, e, p, row[0], now) for e, p in reactions],
            )
            return True

        return await self.write(replace)

    async def sentiment_counts(self, since: str | None = None) -> dict[str, dict[str, int]]:
        """Counts of sentiment labels per role ('user', 'assistant'), optionally since a time."""
        counts: dict[str, dict[str, int]] = {
            role: {"positive": 0, "neutral": 0, "negative": 0} for role in ("user", "assistant")
        }
        async with self._conn.execute(
            "SELECT role, sentiment_label, COUNT(*) FROM messages"
            " WHERE sentiment_label IS NOT NULL AND (? IS NULL OR created_at >= ?)"
            " GROUP BY role, sentiment_label",
            (since, since),
        ) as cur:
            async for role, label, n in cur:
                counts[role][label] = n
        return counts

    async def reaction_counts(self, since: str | None = None) -> dict[int, int]:
        """Reactions on replies by polarity (1, 0, -1), optionally since a time."""
        counts = {1: 0, 0: 0, -1: 0}
        async with self._conn.execute(
            "SELECT polarity, COUNT(*) FROM reactions WHERE ? IS NULL OR created_at >= ?"
            " GROUP BY polarity",
            (since, since),
        ) as cur:
            async for polarity, n in cur:
                counts[polarity] = n
        return counts

    async def turns_since(self, user_id: int, since: str) -> int:
        """How many turns a user started since `since` (for the daily limit)."""
        async with self._conn.execute(
            "SELECT COUNT(*) FROM turns WHERE user_id = ? AND started_at >= ?", (user_id, since)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def usage(self, column: str, since: str | None, limit: int = 5) -> list[tuple[int, int]]:
        """Top `user_id`s or `chat_id`s by tokens used (input + output), optionally since."""
        if column not in ("user_id", "chat_id"):
            raise ValueError(column)
        async with self._conn.execute(
            f"SELECT {column}, SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)) AS n"
            f" FROM turns WHERE {column} IS NOT NULL AND (? IS NULL OR started_at >= ?)"
            f" GROUP BY {column} ORDER BY n DESC LIMIT ?",
            (since, since, limit),
        ) as cur:
            return [(int(k), int(n)) async for k, n in cur]

    async def chat_profile(self, key: ChatKey) -> str | None:
        async with self._conn.execute(
            "SELECT profile FROM chat_profiles WHERE chat_id = ? AND topic_id = ?",
            (key.chat_id, key.topic_id),
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_chat_profile(self, key: ChatKey, profile: str) -> None:
        now = utcnow()
        await self.write(
            lambda conn: conn.execute(
                "INSERT INTO chat_profiles (chat_id, topic_id, profile, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (chat_id, topic_id) DO UPDATE"
                " SET profile = excluded.profile, updated_at = excluded.updated_at",
                (key.chat_id, key.topic_id, profile, now),
            )
        )

    async def total_tokens(self, since: str | None) -> int:
        """Tokens used by every turn (input + output), optionally since a time."""
        async with self._conn.execute(
            "SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)"
            " FROM turns WHERE ? IS NULL OR started_at >= ?",
            (since, since),
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- the inbox of received updates -------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False while storage fails (disk full...): new updates can't be taken in."""
        return self._writer.healthy

    async def inbox_accept(self, updates: Sequence[tuple[int, str]]) -> set[int]:
        """Persist received updates (id, JSON); returns the ids not seen before.

        Raises `StorageUnavailable` at once while storage fails: Telegram still holds them.
        """
        if not updates:
            return set()
        now = utcnow()

        def accept(conn: sqlite3.Connection) -> set[int]:
            fresh = set()
            for update_id, payload in updates:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO inbox (update_id, payload, received_at)"
                    " VALUES (?, ?, ?)",
                    (update_id, payload, now),
                )
                if cur.rowcount:
                    fresh.add(update_id)
            return fresh

        return await self._writer.write(accept, fail_fast=True)

    async def inbox_begin(self, update_id: int, max_attempts: int) -> tuple[int, bool] | None:
        """Count one more attempt at handling an update, before it starts.

        Returns (attempts before this one, set aside): an update whose handling has already
        started `max_attempts` times without finishing (each a crash, or a stop that cut it
        off) is quarantined instead, with its reason. None if the inbox doesn't hold it.
        """
        now = utcnow()

        def begin(conn: sqlite3.Connection) -> tuple[int, bool] | None:
            row = conn.execute(
                "SELECT attempts FROM inbox WHERE update_id = ? AND done_at IS NULL",
                (update_id,),
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            if attempts >= max_attempts:
                conn.execute(
                    "UPDATE inbox SET quarantined_at = ?, done_at = ?, reason = ?"
                    " WHERE update_id = ?",
                    (now, now, f"handling started {attempts} times and never finished", update_id),
                )
                return attempts, True
            conn.execute(
                "UPDATE inbox SET attempts = ? WHERE update_id = ?", (attempts + 1, update_id)
            )
            return attempts, False

        return await self.write(begin)

    async def inbox_quarantine(self, update_ids: Sequence[int], reason: str) -> None:
        """Set updates aside unhandled, with the reason (e.g. parts of a quarantined album)."""
        now = utcnow()
        await self.write(
            lambda conn: conn.executemany(
                "UPDATE inbox SET quarantined_at = ?, done_at = ?, reason = ?"
                " WHERE update_id = ? AND done_at IS NULL",
                [(now, now, reason, u) for u in update_ids],
            )
        )

    async def inbox_done(self, update_ids: Sequence[int]) -> None:
        """Mark updates handled, and forget what earlier handled ones no longer need.

        Continuous housekeeping in the same write: see `_inbox_sweep`.
        """
        now = datetime.now(UTC)

        def done(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE inbox SET done_at = ? WHERE update_id = ? AND done_at IS NULL",
                [(_iso(now), u) for u in update_ids],
            )
            _inbox_sweep(conn, now)

        await self.write(done)

    async def inbox_pending(self) -> list[tuple[int, str]]:
        """Updates received but not handled (a crash), oldest first."""
        return [
            (int(u), str(p))
            for u, p in await self.fetch_all(
                "SELECT update_id, payload FROM inbox WHERE done_at IS NULL ORDER BY update_id"
            )
        ]

    async def inbox_tried(self) -> dict[int, int]:
        """Attempts of the pending updates whose handling started before (and never ended)."""
        return {
            int(u): int(a)
            for u, a in await self.fetch_all(
                "SELECT update_id, attempts FROM inbox WHERE done_at IS NULL AND attempts > 0"
            )
        }

    async def inbox_quarantined(self) -> list[tuple[int, int, str]]:
        """(update id, attempts, reason) of every update set aside, oldest first."""
        return [
            (int(u), int(a), str(r))
            for u, a, r in await self.fetch_all(
                "SELECT update_id, attempts, reason FROM inbox"
                " WHERE quarantined_at IS NOT NULL ORDER BY update_id"
            )
        ]

    async def inbox_purge(self, before: str) -> None:
        """Forget handled updates received before `before` (they only served to dedupe).

        Housekeeping: while storage fails it raises `StorageUnavailable` rather than wait.
        """

        def purge(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < ?", (before,)
            )
            _inbox_sweep(conn, datetime.now(UTC))

        await self._writer.write(purge, fail_fast=True)

    async def answered(self, chat_id: int, user_message_id: int) -> bool:
        """Whether a message already has a logged turn (so a replay must not answer it)."""
        rows = await self._conn.execute_fetchall(
            "SELECT 1 FROM turns WHERE chat_id = ? AND user_message_id = ? LIMIT 1",
            (chat_id, user_message_id),
        )
        return bool(rows)

    # -- fine-tuning jobs -------------------------------------------------------------------

    async def add_job(self, job: JobRecord) -> None:
        await self.write(
            lambda conn: conn.execute(
                "INSERT INTO fine_tune_jobs (job_id, trainer, base_model, training_file,"
                " validation_file, train_examples, validation_examples, tokens, started_by,"
                " description, status, created_at, updated_at, dataset_since, dataset_chat_id,"
                " dataset_photos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.trainer,
                    job.base_model,
                    job.training_file,
                    job.validation_file,
                    job.train_examples,
                    job.validation_examples,
                    job.tokens,
                    job.started_by,
                    job.description,
                    job.status,
                    job.created_at,
                    job.updated_at,
                    job.dataset_since,
                    job.dataset_chat_id,
                    None if job.dataset_photos is None else int(job.dataset_photos),
                ),
            )
        )

    async def update_job(
        self, job_id: str, status: str, fine_tuned_model: str | None, error: str | None
    ) -> None:
        now = utcnow()
        await self.write(
            lambda conn: conn.execute(
                "UPDATE fine_tune_jobs SET status = ?, fine_tuned_model = ?, error = ?,"
                " updated_at = ? WHERE job_id = ?",
                (status, fine_tuned_model, error, now, job_id),
            )
        )

    async def mark_notified(
        self, job_id: str, status: str, notice_message_id: int | None = None
    ) -> None:
        """The admin was told `status`; `notice_message_id`: the message that now says it
        (None keeps the one recorded)."""
        await self.write(
            lambda conn: conn.execute(
                "UPDATE fine_tune_jobs SET notified_status = ?,"
                " notice_message_id = COALESCE(?, notice_message_id) WHERE job_id = ?",
                (status, notice_message_id, job_id),
            )
        )

    async def jobs(self, *, unfinished: bool = False, limit: int = 50) -> list[JobRecord]:
        where = " WHERE status NOT IN ('succeeded', 'failed', 'cancelled')" if unfinished else ""
        async with self._conn.execute(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs{where}"
            " ORDER BY created_at DESC LIMIT ?",
            (limit,),
        ) as cur:
            return [_job(row) async for row in cur]

    async def job(self, job_id: str) -> JobRecord | None:
        async with self._conn.execute(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM fine_tune_jobs WHERE job_id = ?", (job_id,)
        ) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    # -- settings changed in the bot, and /forget -------------------------------------------

    async def get_setting(self, key: str) -> str | None:
        async with self._conn.execute(
            "SELECT value FROM bot_settings WHERE key = ?", (key,)
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def set_setting(self, key: str, value: str) -> None:
        now = utcnow()
        await self.write(
            lambda conn: conn.execute(
                "INSERT INTO bot_settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, now),
            )
        )

    async def forget_user(self, user_id: int, quotes: QuoteFinder) -> Forgotten:
        """Delete every word of a user's the store holds, and opt them out of datasets.

        In one transaction: their turns (and what hangs off them: messages, reply ids,
        images no other turn uses, reactions on them) and their reactions anywhere; other
        people's turns that quote them (as `quotes` finds quotes) get the quoted words
        replaced and are left out of datasets for good; the server-side conversations of
        every chat thread that held their words or such quotes are unlinked (a group's open
        thread is rebuilt from the log on its next turn; their private chat's threads are
        closed) and queued for deletion (`doomed_conversations`); the JSON of every handled
        update is blanked now (theirs among them), quarantined ones too where they concern
        the user. The quotes are looked for first on a snapshot outside the writer (a big
        group's log takes a while); the transaction then only looks at turns since.
        """
        scan = _QuoteScan()
        path = await self._file()
        await asyncio.to_thread(_scan_snapshot, path, user_id, quotes, scan)
        now = utcnow()
        return await self.write(lambda conn: _forget(conn, user_id, quotes, scan, now))

    async def doomed_conversations(self) -> list[str]:
        """Server-side conversations that held forgotten words and are not deleted yet."""
        return [
            str(row[0])
            for row in await self.fetch_all(
                "SELECT conversation_id FROM doomed_conversations ORDER BY created_at"
            )
        ]

    async def conversations_gone(self, conversation_ids: Sequence[str]) -> None:
        """The server confirmed these conversations deleted (or never had them)."""
        if conversation_ids:
            await self.write(
                lambda conn: conn.executemany(
                    "DELETE FROM doomed_conversations WHERE conversation_id = ?",
                    [(c,) for c in conversation_ids],
                )
            )

    async def checkpoint(self, attempts: int = 3) -> bool:
        """Move the write-ahead log into the database file and truncate it; True if done.

        After /forget: the WAL still holds earlier images of the pages the deleted words
        were on (a checkpoint copies only the latest, zeroed by secure_delete). Runs on a
        connection of its own in a thread; readers in the middle of a query can hold it up,
        so it is tried a few times.
        """
        path = await self._file()
        for attempt in range(attempts):
            if await asyncio.to_thread(_checkpoint, path):
                return True
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2)
        return False

    async def _file(self) -> str:
        """The database file's path, as the reader's connection opened it."""
        rows = await self.fetch_all("SELECT file FROM pragma_database_list WHERE name = 'main'")
        return str(rows[0][0])

    async def conversation_ids(self, chat_id: int) -> list[str]:
        """Server-side conversation ids of every thread a chat ever had (open or closed)."""
        return [
            str(row[0])
            for row in await self.fetch_all(
                "SELECT conversation_id FROM threads"
                " WHERE chat_id = ? AND conversation_id IS NOT NULL ORDER BY id",
                (chat_id,),
            )
        ]

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Run a read query (used by stats and tests); explicit SQL, parameterised."""
        async with self._conn.execute(sql, params) as cur:
            return [tuple(row) for row in await cur.fetchall()]


def _job(row: Sequence[Any]) -> JobRecord:
    job = JobRecord(*row)
    if job.dataset_photos is not None:
        job.dataset_photos = bool(job.dataset_photos)  # stored as 0 or 1
    return job


def _tag(sentiment: SentimentRow | None) -> SentimentRow | tuple[None, None, None]:
    return sentiment if sentiment is not None else (None, None, None)


@dataclass(slots=True)
class _QuoteScan:
    """Quotes of a forgotten user found so far, and how far the log was looked at."""

    upto: int = 0  # the highest turn id looked at
    chats: set[int] = field(default_factory=set)  # chats whose turns up to `upto` were seen
    found: dict[int, tuple[int, str]] = field(default_factory=dict)  # message: (turn, text)


def _scan_quotes(
    conn: sqlite3.Connection, user_id: int, quotes: QuoteFinder, scan: _QuoteScan
) -> None:
    """Learn the user's messages logged since `scan.upto`, then look for quotes of them in
    other people's turns (user text and answer) of every chat the user spoke in: those
    logged since, and all of those in a chat not looked at before."""
    (upto,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM turns").fetchone()
    for (text,) in conn.execute(
        "SELECT m.content FROM turns t JOIN messages m ON m.turn_id = t.id"
        " WHERE t.user_id = ? AND t.id > ? AND t.id <= ? AND m.role = 'user'",
        (user_id, scan.upto, upto),
    ):
        quotes.learn(text)
    chats = {
        int(row[0])
        for row in conn.execute("SELECT DISTINCT chat_id FROM turns WHERE user_id = ?", (user_id,))
    }
    for chat_id in sorted(chats):
        since = scan.upto if chat_id in scan.chats else 0
        rows = conn.execute(
            "SELECT m.id, m.turn_id, m.content FROM turns t JOIN messages m ON m.turn_id = t.id"
            " WHERE t.chat_id = ? AND t.id > ? AND t.id <= ? AND t.user_id IS NOT ?",
            (chat_id, since, upto, user_id),
        )
        for message_id, turn_id, content in rows:
            redacted = quotes.redact(content)
            if redacted is not None:
                scan.found[int(message_id)] = (int(turn_id), redacted)
    scan.upto = int(upto)
    scan.chats |= chats


def _scan_snapshot(path: str, user_id: int, quotes: QuoteFinder, scan: _QuoteScan) -> None:
    """`_scan_quotes` on a read-only connection of its own, in one snapshot."""
    conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        _scan_quotes(conn, user_id, quotes, scan)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _forget(
    conn: sqlite3.Connection, user_id: int, quotes: QuoteFinder, scan: _QuoteScan, now: str
) -> Forgotten:
    """Store.forget_user's transaction."""
    _scan_quotes(conn, user_id, quotes, scan)  # what was logged since the snapshot
    found = list(scan.found.items())
    conn.executemany(
        "UPDATE messages SET content = ? WHERE id = ?", [(text, m) for m, (_, text) in found]
    )
    quoting = sorted({turn_id for _, (turn_id, _) in found})
    conn.executemany(
        "INSERT OR IGNORE INTO dataset_exclusions (turn_id, reason, created_at)"
        " SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM turns WHERE id = ?)",
        [(t, QUOTES_FORGOTTEN, now, t) for t in quoting],
    )
    # Every chat thread that held their words or a quote of them.
    keys = set(
        conn.execute("SELECT DISTINCT chat_id, topic_id FROM turns WHERE user_id = ?", (user_id,))
    )
    for turn_id in quoting:
        keys.update(conn.execute("SELECT chat_id, topic_id FROM turns WHERE id = ?", (turn_id,)))
    (messages,) = conn.execute(
        "SELECT COUNT(*) FROM messages WHERE turn_id IN (SELECT id FROM turns WHERE user_id = ?)",
        (user_id,),
    ).fetchone()
    conn.execute("DELETE FROM reactions WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM turns WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM images WHERE sha256 NOT IN (SELECT sha256 FROM turn_images)")
    conn.execute(
        "INSERT INTO opted_out_users (user_id, created_at) VALUES (?, ?)"
        " ON CONFLICT (user_id) DO NOTHING",
        (user_id, now),
    )
    # Their server-side copies. A private chat's id is the user's id: its threads close, so
    # the next message starts afresh. A group's open thread stays open without a
    # conversation: its next turn seeds a new one from what the log still holds.
    threads = conn.execute(
        "SELECT id, conversation_id FROM threads WHERE chat_id = ? AND conversation_id IS NOT NULL",
        (user_id,),
    ).fetchall()
    for chat_id, topic_id in keys:
        if chat_id != user_id:
            threads += conn.execute(
                "SELECT id, conversation_id FROM threads"
                " WHERE chat_id = ? AND topic_id = ? AND conversation_id IS NOT NULL",
                (chat_id, topic_id),
            ).fetchall()
    conn.executemany(
        "UPDATE threads SET conversation_id = NULL WHERE id = ?", [(t,) for t, _ in threads]
    )
    conn.executemany(
        "INSERT OR IGNORE INTO doomed_conversations (conversation_id, created_at) VALUES (?, ?)",
        [(c, now) for _, c in threads],
    )
    conn.execute(
        "UPDATE threads SET closed_at = ? WHERE chat_id = ? AND closed_at IS NULL", (now, user_id)
    )
    # The inbox: handled updates only serve to dedupe, so every one loses its JSON now;
    # quarantined ones keep theirs unless they concern the user. Updates not handled yet
    # are left to be answered (their JSON goes once they are).
    conn.execute(
        "UPDATE inbox SET payload = '' WHERE done_at IS NOT NULL AND payload != ''"
        " AND quarantined_at IS NULL"
    )
    held = conn.execute(
        "SELECT update_id, payload FROM inbox WHERE quarantined_at IS NOT NULL AND payload != ''"
    ).fetchall()
    conn.executemany(
        "UPDATE inbox SET payload = '' WHERE update_id = ?",
        [
            (update_id,)
            for update_id, payload in held
            if _concerns(payload, user_id) or quotes.redact(payload) is not None
        ],
    )
    conn.execute(
        "INSERT INTO bot_settings (key, value, updated_at) VALUES (?, '1', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1,"
        " updated_at = excluded.updated_at",
        (FORGET_GENERATION, now),
    )
    return Forgotten(int(messages), len(quoting), len({c for _, c in threads}))


def _concerns(payload: str, user_id: int) -> bool:
    """Whether an update's JSON holds the user (as sender, replied-to, forwarded...) or their
    private chat anywhere in it."""
    try:
        update = json.loads(payload)
    except ValueError:
        return str(user_id) in payload  # unreadable: err on the side of forgetting
    stack = [update]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("id") == user_id and ("is_bot" in node or node.get("type") == "private"):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _checkpoint(path: str) -> bool:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        busy, _log, _moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return busy == 0


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _inbox_sweep(conn: sqlite3.Connection, now: datetime) -> None:
    """Blank the JSON of updates handled more than INBOX_PAYLOAD_KEEP ago; delete the rows
    of handled updates received more than INBOX_KEEP ago.

    Both are ranges of partial indexes (migration 9) holding only the rows still to be
    swept, so running this with every `inbox_done` costs a few rows, never a scan.
    """
    conn.execute(
        "UPDATE inbox SET payload = '' WHERE done_at < ? AND payload != ''"
        " AND quarantined_at IS NULL",
        (_iso(now - INBOX_PAYLOAD_KEEP),),
    )
    conn.execute(
        "DELETE FROM inbox WHERE done_at IS NOT NULL AND received_at < ?",
        (_iso(now - INBOX_KEEP),),
    )
