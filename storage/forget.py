"""/forget: every word of a user's the store holds deleted in one transaction, quotes of
them redacted, and the server-side conversations that held them queued for deletion."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.domain import QUOTES_FORGOTTEN, Forgotten, QuoteFinder, utcnow
from storage.base import Part

# /forget: every one bumps this bot setting in its transaction, so a dataset built from a
# snapshot taken before is known to be stale; turns that quoted the forgotten user are
# left out of datasets with this reason (QUOTES_FORGOTTEN).
FORGET_GENERATION = "forget_generation"


class ForgetStore(Part):
    """Forgetting a user, and the server-side conversations left to delete."""

    async def user(self, user_id: int, quotes: QuoteFinder) -> Forgotten:
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
        return await self._write(lambda conn: _forget(conn, user_id, quotes, scan, now))

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
        if conversation_ids:
            await self._write(
                lambda conn: conn.executemany(
                    "DELETE FROM doomed_conversations WHERE conversation_id = ?",
                    [(c,) for c in conversation_ids],
                )
            )


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
    """ForgetStore.user's transaction."""
    _scan_quotes(conn, user_id, quotes, scan)  # what was logged since the snapshot
    found = list(scan.found.items())
    # Redacted from what each message holds now, not from the snapshot: another /forget
    # may have redacted it since, and this one must not write its words back.
    redactions = []
    for message_id, _found in found:
        row = conn.execute("SELECT content FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is not None and (text := quotes.redact(row[0])) is not None:
            redactions.append((text, message_id))
    conn.executemany("UPDATE messages SET content = ? WHERE id = ?", redactions)
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
