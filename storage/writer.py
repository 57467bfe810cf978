"""The database's one writer: a thread with its own connection that commits writes in batches.

SQLite has one writer at a time anyway; here it is explicit. A write is a plain function of
a `sqlite3.Connection`, handed to the thread in the same step of the event loop that asks
for it. The thread takes everything queued, runs each function in a savepoint of one
transaction (group commit), commits, and wakes the callers.

Why not a transaction over aiosqlite: every statement there is a hand-off to its thread and
back, and under load each hand-off waits for the event loop to come round, with every other
chat's write queued behind the open transaction. With ~10 statements per turn a commit took
~150 ms at 30 busy chats; a reply sent to Telegram but not yet recorded is the one thing a
crash can make the bot send twice, so that window must be as short as it can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], object]
_Item = tuple[Work, asyncio.Future[object], asyncio.AbstractEventLoop]

MAX_BATCH = 500  # writes per transaction at most


class WriterClosed(Exception):
    """The writer was closed: no more writes are taken."""


class Writer:
    """Runs writes in a thread of its own, in arrival order, committed in batches."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self._dead: Exception | None = None  # why the thread stopped early, if it did
        self._thread = threading.Thread(target=self._run, name="parley-db-writer", daemon=True)
        self._thread.start()

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in a transaction of the writer's; its result, or its exception.

        A cursor returned by `work` is closed in the thread and comes back as None. `work`
        must not end the transaction itself (no COMMIT, no `executescript`, which commits).

        A work that raises is rolled back alone. Once asked for, a write is carried out even
        if the caller is cancelled: the work is already on its way.
        """
        if self._closed:
            raise WriterClosed("the database is closed")
        if self._dead is not None:
            raise WriterClosed("the database writer stopped") from self._dead
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._queue.put((work, future, loop))
        if self._dead is not None:  # died while this was being queued: don't wait forever
            self._fail_all(self._dead)
        return cast(T, await future)

    async def close(self) -> None:
        """Carry out every write asked for so far, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None)
        except Exception as exc:
            self._fail_all(exc)
            return
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._commit(conn, batch)
                if stop:
                    return
        except Exception as exc:
            self._fail_all(exc)
        finally:
            conn.close()

    def _fail_all(self, exc: Exception) -> None:
        """The thread cannot go on: every write asked for, and every later one, gets `exc`."""
        log.error("the database writer stopped: %s", type(exc).__name__)
        self._dead = exc
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _, future, loop = item
                with contextlib.suppress(RuntimeError):  # that loop is gone
                    loop.call_soon_threadsafe(_settle, future, False, exc)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        outcomes: list[tuple[bool, object]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for work, _, _ in batch:
                conn.execute("SAVEPOINT work")
                try:
                    outcomes.append((True, _plain(work(conn))))
                except Exception as exc:
                    conn.execute("ROLLBACK TO work")
                    outcomes.append((False, exc))
                conn.execute("RELEASE work")
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (disk full, locked...): none written
            log.error("a batch of %d write(s) failed: %s", len(batch), type(exc).__name__)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            outcomes = [(False, exc)] * len(batch)
        for (_, future, loop), (ok, value) in zip(batch, outcomes, strict=True):
            try:
                loop.call_soon_threadsafe(_settle, future, ok, value)
            except RuntimeError:
                pass  # the caller's loop is gone (shutdown): nobody is waiting


def _plain(result: object) -> object:
    """A work's result, made safe to hand to another thread.

    A cursor (what `lambda conn: conn.execute(...)` returns) must not leave the writer:
    finalized by the garbage collector in the event loop's thread, it would touch the
    connection while the writer uses it (sqlite3: "bad parameter or other API misuse").
    """
    if isinstance(result, sqlite3.Cursor):
        result.close()
        return None
    return result


def _settle(future: asyncio.Future[object], ok: bool, value: object) -> None:
    if future.done():  # the caller was cancelled; the write happened all the same
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(cast(BaseException, value))
