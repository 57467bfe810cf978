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

When storage fails (disk full, I/O errors, a lock held too long), writes are of two kinds.
A *fail-fast* write (taking in a new update) is refused at once with `StorageUnavailable`:
Telegram still holds the update, so nothing is lost, and the bot must not take on work it
cannot record. Every other write is the record of something already done (a reply sent, an
update handled): it waits and is retried, with capped exponential backoff, until storage
works again, so a delivered answer is never reported as failed or answered twice. A few
megabytes of disk are kept in reserve (a file beside the database, released at the first
"disk full") so that those records land at once when the disk fills up; the writer counts
as recovered when the reserve can be taken back and a real write goes through. Each change
of state is logged once, not every try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from bot.errors import StorageUnavailable, WriterClosed

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], object]
# (work, its future, the caller's loop, whether it fails fast while storage is failing)
_Item = tuple[Work, asyncio.Future[object], asyncio.AbstractEventLoop, bool]

MAX_BATCH = 500  # writes per transaction at most
RESERVE_BYTES = 4 * 1024 * 1024  # disk kept free for the records of work in progress
RETRY_FIRST = 0.25  # seconds before the first retry while storage fails; doubles each time
RETRY_MAX = 5.0  # ... up to this
CLOSE_TIMEOUT = 2.0  # seconds close() waits for writes that cannot land

# SQLite's primary result codes that mean "storage", not "this write": worth retrying.
_BUSY, _LOCKED, _IOERR, _FULL, _CANTOPEN, _READONLY = 5, 6, 10, 13, 14, 8
_STORAGE_CODES = frozenset({_BUSY, _LOCKED, _IOERR, _FULL, _CANTOPEN, _READONLY})


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` is storage failing (retry later) rather than a problem with the write."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (code & 0xFF) in _STORAGE_CODES
        return isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc)
    return isinstance(exc, OSError)


class _StorageFailed(Exception):
    """Inside the thread: a batch failed because of storage; nothing of it was written."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


class Writer:
    """Runs writes in a thread of its own, in arrival order, committed in batches."""

    def __init__(self, path: Path, *, reserve_bytes: int = RESERVE_BYTES) -> None:
        self._path = path
        self._reserve = path.with_name(path.name + "-reserve")
        self._reserve_bytes = reserve_bytes
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self._abandon = False  # close() gave up waiting: stop retrying
        self._dead: Exception | None = None  # why the thread stopped early, if it did
        # While storage fails: when the next try is due, and the wait after that one.
        self._failing_since: float | None = None
        self._next_try = 0.0
        self._backoff = RETRY_FIRST
        self._failure = ""  # what failed, for the log
        self._thread = threading.Thread(target=self._run, name="parley-db-writer", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """False while storage fails: new work (fail-fast writes) is refused."""
        return self._failing_since is None and self._dead is None and not self._closed

    async def write(self, work: Callable[[sqlite3.Connection], T], *, fail_fast: bool = False) -> T:
        """Run `work` in a transaction of the writer's; its result, or its exception.

        A cursor returned by `work` is closed in the thread and comes back as None. `work`
        must not end the transaction itself (no COMMIT, no `executescript`, which commits).

        A work that raises is rolled back alone. Once asked for, a write is carried out even
        if the caller is cancelled: the work is already on its way. While storage fails, a
        `fail_fast` write raises `StorageUnavailable`; any other waits until it lands.
        """
        if self._closed:
            raise WriterClosed("the database is closed")
        if self._dead is not None:
            raise WriterClosed("the database writer stopped") from self._dead
        if fail_fast and self._failing_since is not None and time.monotonic() < self._next_try:
            raise StorageUnavailable(self._failure)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        self._queue.put((work, future, loop, fail_fast))
        if self._dead is not None:  # died while this was being queued: don't wait forever
            self._fail_all(self._dead)
        return cast(T, await future)

    async def close(self, wait: float = CLOSE_TIMEOUT) -> None:
        """Carry out every write asked for so far, then stop the thread.

        Writes that storage can't take are tried once more; if storage still fails after
        `wait` seconds, the thread is left behind (it is a daemon) and its writes with it,
        so that shutdown never hangs on a full disk.
        """
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        deadline = time.monotonic() + wait
        while self._thread.is_alive():
            if self._failing_since is not None and time.monotonic() > deadline:
                self._abandon = True
                log.error("the database writer did not finish in %.0f s; leaving it", wait)
                return
            await asyncio.sleep(0.01)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None)
        except Exception as exc:
            self._fail_all(exc)
            return
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            # Deleted content is overwritten with zeros, not left in free space: /forget must
            # not leave the words it deletes readable in the file.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            if not self._take_reserve():
                log.warning("no room for the %d-byte storage reserve", self._reserve_bytes)
            held: list[_Item] = []  # records waiting for storage to work again
            while True:
                timeout = None
                if self._failing_since is not None:
                    timeout = max(0.0, self._next_try - time.monotonic())
                batch, stop = self._take(timeout)
                held = self._handle(conn, held, batch, final=stop)
                if stop or self._abandon:
                    for _, future, loop, _ in held:
                        _settle_from_thread(future, loop, False, WriterClosed("storage failing"))
                    return
        except Exception as exc:
            self._fail_all(exc)
        finally:
            conn.close()

    def _take(self, timeout: float | None) -> tuple[list[_Item], bool]:
        """What is queued (waiting up to `timeout` for the first); True once close() asked."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False

    def _handle(
        self, conn: sqlite3.Connection, held: list[_Item], batch: list[_Item], *, final: bool
    ) -> list[_Item]:
        """Commit what can be; returns the records still waiting for storage."""
        keep: list[_Item] = []
        attempt = batch
        if self._failing_since is None and any(item[3] for item in batch) and not self._room():
            # The disk is nearly full: take no new work before SQLite runs out of room.
            self._enter_failing("disk nearly full")
        if self._failing_since is not None:
            due = final or time.monotonic() >= self._next_try
            if due and self._room() and self._probe(conn):
                self._recovered()
                attempt = held + batch
            else:
                # No new work while storage fails. Records of work in progress are tried as
                # they come (the reserve may hold them); those that didn't fit, when due.
                for item in batch:
                    if item[3]:
                        _settle_from_thread(item[1], item[2], False, StorageUnavailable())
                fresh = [item for item in batch if not item[3]]
                if due:
                    self._schedule_retry()
                    attempt = held + fresh
                else:
                    keep, attempt = held, fresh
        if not attempt:
            return keep
        try:
            self._commit(conn, attempt)
        except _StorageFailed as failed:
            return keep + self._on_failure(conn, attempt, failed.cause)
        return keep

    def _on_failure(
        self, conn: sqlite3.Connection, attempt: list[_Item], cause: BaseException
    ) -> list[_Item]:
        self._enter_failing(getattr(cause, "sqlite_errorname", None) or type(cause).__name__)
        for item in attempt:
            if item[3]:
                _settle_from_thread(item[1], item[2], False, StorageUnavailable(self._failure))
        records = [item for item in attempt if not item[3]]
        if records and self._release_reserve():
            try:
                self._commit(conn, records)
                records = []
            except _StorageFailed:
                pass
        if self._next_try <= time.monotonic():
            self._schedule_retry()
        return records

    def _enter_failing(self, reason: str) -> None:
        if self._failing_since is not None:
            return
        self._failing_since = time.monotonic()
        self._failure = reason
        self._backoff = RETRY_FIRST
        self._schedule_retry()
        log.error(
            "storage is failing (%s): new updates are refused, and records of work in"
            " progress wait until it works again",
            reason,
        )

    def _schedule_retry(self) -> None:
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)

    def _recovered(self) -> None:
        assert self._failing_since is not None
        log.warning(
            "storage works again after %.1f s of failing (%s)",
            time.monotonic() - self._failing_since,
            self._failure,
        )
        self._failing_since = None
        self._backoff = RETRY_FIRST

    def _probe(self, conn: sqlite3.Connection) -> bool:
        """A real write (the header's user_version, unchanged): True if storage took it."""
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not is_storage_error(exc):
                raise
            return False
        return True

    def _room(self) -> bool:
        """Room for new work: the reserve is held, and at least as much again is free."""
        if self._reserve_bytes <= 0:
            return True
        if not self._take_reserve():
            return False
        try:
            disk = os.statvfs(self._path.parent)
        except (OSError, AttributeError):  # no statvfs (Windows): SQLite's errors tell
            return True
        return disk.f_bavail * disk.f_frsize >= self._reserve_bytes

    def _take_reserve(self) -> bool:
        """Make sure the reserve file holds its space; False if the disk has no room for it."""
        if self._reserve_bytes <= 0:
            return True
        try:
            if self._reserve.stat().st_size >= self._reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self._reserve_bytes)
                else:  # pragma: no cover - macOS, Windows
                    os.write(fd, bytes(self._reserve_bytes))
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()
            return False
        return True

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the disk; True if there was one."""
        try:
            self._reserve.unlink()
        except OSError:
            return False
        log.warning("released the storage reserve for the records of work in progress")
        return True

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
                _settle_from_thread(item[1], item[2], False, exc)

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> None:
        """Run and commit `batch`; raises _StorageFailed (nothing written, nobody woken)."""
        outcomes: list[tuple[bool, object]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for work, _, _, _ in batch:
                conn.execute("SAVEPOINT work")
                try:
                    outcomes.append((True, _plain(work(conn))))
                except Exception as exc:
                    if is_storage_error(exc):
                        raise
                    conn.execute("ROLLBACK TO work")
                    outcomes.append((False, exc))
                conn.execute("RELEASE work")
            conn.execute("COMMIT")
        except Exception as exc:  # BEGIN, COMMIT or storage under a work failed: none written
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if is_storage_error(exc):
                raise _StorageFailed(exc) from exc
            log.error("a batch of %d write(s) failed: %s", len(batch), type(exc).__name__)
            outcomes = [(False, exc)] * len(batch)
        for (_, future, loop, _), (ok, value) in zip(batch, outcomes, strict=True):
            _settle_from_thread(future, loop, ok, value)


def _settle_from_thread(
    future: asyncio.Future[object], loop: asyncio.AbstractEventLoop, ok: bool, value: object
) -> None:
    with contextlib.suppress(RuntimeError):  # the caller's loop is gone (shutdown)
        loop.call_soon_threadsafe(_settle, future, ok, value)


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
