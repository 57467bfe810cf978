"""Telegram's rate limits shared by every replica: one GCRA bucket per limit, in the database.

Each bucket keeps its theoretical arrival time (`tat`, epoch seconds): when the bucket will
have drained of the requests reserved so far. A reservation moves `tat` on by one interval
and tells the caller how long to wait for its slot; it is never refused, so requests queue
in the order the database took them, whichever replica sent them. `burst` requests may go
at once from a drained bucket (GCRA's tolerance is `burst - 1` intervals).

Every reservation is one statement on an autocommit connection, so it is atomic (the row
lock orders replicas) and costs one round trip. `now` is the server's clock
(`clock_timestamp()`), never a replica's, and callers only get back a relative wait: the
replicas' clocks need not agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from bot.errors import StorageUnavailable, WriterClosed
from storage.pg.base import PgPart, is_storage_error

# (key, seconds between requests, requests that may go at once from a drained bucket)
Bucket = tuple[str, float, float]

_NOW = "now AS MATERIALIZED (SELECT extract(epoch FROM clock_timestamp())::float8 AS t)"


def _take(where: str = "") -> str:
    """The upsert reserving one slot in a bucket and returning the caller's wait as `wait`;
    its parameters are `_args(...)`."""
    return (
        "INSERT INTO rate_buckets AS b (key, tat) SELECT %s, now.t + %s"
        f" FROM now{where}"
        " ON CONFLICT (key) DO UPDATE SET tat = GREATEST(b.tat, EXCLUDED.tat - %s) + %s"
        # The new tat is one interval past the slot; the slot less the tolerance is when the
        # request may go.
        " RETURNING GREATEST(0, b.tat - %s - (SELECT t FROM now)) AS wait"
    )


def _args(key: str, interval: float, burst: float) -> list[object]:
    tolerance = max(burst - 1.0, 0.0) * interval
    return [key, interval, interval, interval, interval + tolerance]


_RESERVE = f"WITH {_NOW} {_take()}"

# Both buckets in one statement, the second only when the first lets the caller go now
# (`second` reads `first`'s result, so `first` runs, and locks its row, before it).
_RESERVE_THEN = (
    f"WITH {_NOW}, first AS ({_take()}),"
    f" second AS ({_take(', first WHERE first.wait <= 0')})"
    " SELECT first.wait, (SELECT wait FROM second) FROM first"
)

_HOLD = (
    "INSERT INTO rate_buckets AS b (key, tat)"
    " VALUES (%s, extract(epoch FROM clock_timestamp())::float8 + %s)"
    " ON CONFLICT (key) DO UPDATE SET tat = GREATEST(b.tat, EXCLUDED.tat) RETURNING b.tat"
)

# A bucket whose tat has passed is drained: the same as no row at all.
_PRUNE = (
    "WITH gone AS (DELETE FROM rate_buckets"
    " WHERE tat <= extract(epoch FROM clock_timestamp())::float8 RETURNING 1)"
    " SELECT count(*) FROM gone"
)


class PgRateStore(PgPart):
    """The shared buckets (bot/ratelimit.py's `RateBuckets`, over table rate_buckets)."""

    async def reserve(self, key: str, interval: float, burst: float) -> float:
        """Reserve the next slot in bucket `key` (one request per `interval` seconds, `burst`
        at once): the seconds to wait before sending, 0 to send now."""
        row = await self._run(_RESERVE, _args(key, interval, burst))
        return float(row[0])

    async def reserve_then(self, first: Bucket, then: Bucket) -> tuple[float, bool]:
        """Reserve a slot in `first` and, in the same round trip, one in `then` if `first`
        lets the caller go now. Returns (the wait, whether `then` was reserved): the wait is
        `then`'s if it was, else `first`'s, and the caller reserves in `then` after waiting.

        `then` is not reserved before the request can use it: a request held back by
        `first` would leave `then`'s slot idle, then go later in a slot reserved for another
        request, and the two together would exceed `then`'s rate."""
        row = await self._run(_RESERVE_THEN, _args(*first) + _args(*then))
        if row[1] is None:
            return float(row[0]), False
        return float(row[1]), True

    async def hold(self, key: str, seconds: float, interval: float, burst: float) -> None:
        """Let no request of bucket `key` go for `seconds` (Telegram said to retry after
        them), then one per `interval` with no burst: the queue built up meanwhile is spaced
        rather than let out at once."""
        await self._run(_HOLD, [key, seconds + max(burst - 1.0, 0.0) * interval])

    async def prune(self) -> int:
        """Delete drained buckets (there is one per group chat ever limited); how many."""
        row = await self._run(_PRUNE, [])
        return int(row[0])

    async def _run(self, sql: str, params: Sequence[object]) -> tuple[Any, ...]:
        """One statement on an autocommit connection, its one row; the database's failures
        as bot.errors' exceptions, so the limiter can fall back to limiting this process
        alone without knowing psycopg."""
        if self._health.closed:
            raise WriterClosed("the store is closed")
        try:
            row = await self._fetch_one(sql, params)
        except psycopg.Error as exc:
            if self._health.closed:
                raise WriterClosed("the store is closed") from exc
            if is_storage_error(exc):
                raise StorageUnavailable("the database is unavailable") from exc
            raise
        if row is None:
            raise AssertionError("the statement returned no row")
        return row
