"""Telegram's rate limits for the bot as a whole when several replicas send for it.

PTB's AIORateLimiter counts in one process: two replicas would each send 30 requests a
second. `SharedRateLimiter` keeps PTB's rules (which requests count, what is a group, how a
RetryAfter is retried) but takes its slots from buckets every replica shares (the
PostgreSQL store's `rates`, storage/pg/rates.py): each request reserves the next slot,
sleeps until it, then goes, so the bot's requests are spaced and served in the order they
asked, whichever replica sends them.

While the shared buckets can't be reached (the database is down, the store is closed, or
none is attached yet), each process limits itself alone with `LocalBuckets`: a reply is
better sent at one replica's rate than held until the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from telegram import constants
from telegram._utils.types import JSONDict
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

from bot.errors import StorageUnavailable, WriterClosed

log = logging.getLogger(__name__)

T = TypeVar("T")
# (key, seconds between requests, requests that may go at once from a drained bucket)
Bucket = tuple[str, float, float]
Result = bool | JSONDict | list[JSONDict]
Callback = Callable[..., Coroutine[Any, Any, Result]]

RETRY_MARGIN = 0.1  # seconds added to Telegram's retry_after, as AIORateLimiter does
PRUNE_EVERY = 3600.0  # seconds between deletions of drained shared buckets


class RateBuckets(Protocol):
    """GCRA buckets: a reservation is never refused, it says how long to wait for the slot."""

    async def reserve(self, key: str, interval: float, burst: float) -> float:
        """Reserve the next slot in bucket `key`: the seconds to wait before sending."""
        ...

    async def reserve_then(self, first: Bucket, then: Bucket) -> tuple[float, bool]:
        """Reserve in `first` and, if that needs no wait, in `then`: (the wait, whether
        `then` was reserved)."""
        ...

    async def hold(self, key: str, seconds: float, interval: float, burst: float) -> None:
        """Let nothing of bucket `key` go for `seconds`, then one per interval."""
        ...

    async def prune(self) -> int:
        """Forget drained buckets."""
        ...


class LocalBuckets:
    """The same buckets in this process's memory, on its monotonic clock."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    async def reserve(self, key: str, interval: float, burst: float) -> float:
        now = time.monotonic()
        slot = max(self._tat.get(key, now), now)
        self._tat[key] = slot + interval
        return max(0.0, slot - _tolerance(interval, burst) - now)

    async def reserve_then(self, first: Bucket, then: Bucket) -> tuple[float, bool]:
        wait = await self.reserve(*first)
        if wait > 0:
            return wait, False
        return await self.reserve(*then), True

    async def hold(self, key: str, seconds: float, interval: float, burst: float) -> None:
        until = time.monotonic() + seconds + _tolerance(interval, burst)
        self._tat[key] = max(self._tat.get(key, until), until)

    async def prune(self) -> int:
        now = time.monotonic()
        drained = [key for key, tat in self._tat.items() if tat <= now]
        for key in drained:
            del self._tat[key]
        return len(drained)


def _tolerance(interval: float, burst: float) -> float:
    return max(burst - 1.0, 0.0) * interval


class SharedRateLimiter(BaseRateLimiter[int]):
    """AIORateLimiter's limits over buckets shared by the replicas.

    As in AIORateLimiter: a request with a `chat_id` counts against the bot's overall rate;
    one whose chat is a group or channel (a negative id, or an @username) also against that
    chat's rate; one with `allow_paid_broadcast` only against the paid rate. Requests without
    a chat (getMe, answerCallbackQuery...) are not limited. A RetryAfter holds every request
    for retry_after + 0.1 s, in this process and, through the overall bucket, in the other
    replicas, and the request is retried up to `max_retries` times (`rate_limit_args`, when
    given, overrides it). A rate or period of 0 turns that limit off.

    A drained bucket lets `burst` requests go at once (by default as many as the rate allows
    in one period, like AIORateLimiter's leaky bucket), then one per period / rate.
    """

    __slots__ = (
        "_group",
        "_halted_until",
        "_local",
        "_max_retries",
        "_next_prune",
        "_overall",
        "_paid",
        "_shared",
        "_using_local",
    )

    def __init__(
        self,
        buckets: RateBuckets | None = None,
        *,
        overall_max_rate: float = constants.FloodLimit.MESSAGES_PER_SECOND,
        overall_time_period: float = 1.0,
        group_max_rate: float = constants.FloodLimit.MESSAGES_PER_MINUTE_PER_GROUP,
        group_time_period: float = 60.0,
        max_retries: int = 0,
        overall_burst: float | None = None,
        group_burst: float | None = None,
    ) -> None:
        self._shared = buckets
        self._local = LocalBuckets()
        self._using_local = False
        self._overall = _rate(overall_max_rate, overall_time_period, overall_burst)
        self._group = _rate(group_max_rate, group_time_period, group_burst)
        self._paid = _rate(constants.FloodLimit.PAID_MESSAGES_PER_SECOND, 1.0, None)
        self._max_retries = max_retries
        self._halted_until = 0.0  # monotonic: no request of this process goes before it
        self._next_prune = 0.0

    def attach(self, buckets: RateBuckets) -> None:
        """Take slots from `buckets` from now on (the store opens after the bot is built)."""
        self._shared = buckets

    async def initialize(self) -> None:
        """Nothing to set up: the buckets belong to the store."""

    async def shutdown(self) -> None:
        """Nothing to release: the buckets belong to the store."""

    async def process_request(
        self,
        callback: Callback,
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,  # noqa: ARG002
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> Result:
        max_retries = rate_limit_args or self._max_retries
        chat_id = data.get("chat_id")
        turns = self._buckets(chat_id, paid=bool(data.get("allow_paid_broadcast", False)))
        for attempt in range(max_retries + 1):
            await self._take_turn(turns)
            await self._wait_halt()
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                if attempt == max_retries:
                    log.exception("Telegram rate limit hit after %d retries", max_retries)
                    raise
                # The public `retry_after` warns of its coming type change; PTB reads this.
                pause = exc._retry_after.total_seconds() + RETRY_MARGIN
                log.info("Telegram rate limit hit: retrying in %.1f s", pause)
                await self._halt(pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    def _buckets(self, chat_id: object, *, paid: bool) -> list[Bucket]:
        """The buckets a request takes a slot in, in order."""
        if chat_id is None:
            return []
        if paid:
            return [("tg:paid", *self._paid)] if self._paid else []
        turns: list[Bucket] = []
        group = _group_of(chat_id)
        if group is not None and self._group:
            turns.append((f"tg:chat:{group}", *self._group))
        if self._overall:
            turns.append(("tg:all", *self._overall))
        return turns

    async def _take_turn(self, turns: list[Bucket]) -> None:
        """Reserve a slot in each bucket in turn, waiting for one before reserving the next
        (a slot reserved before the request can use it would be wasted and crowd a later
        one); one round trip when the first needs no wait."""
        if not turns:
            return
        await self._prune()
        if len(turns) == 1:
            wait = await self._call(lambda b: b.reserve(*turns[0]))
        else:
            wait, both = await self._call(lambda b: b.reserve_then(turns[0], turns[1]))
            if not both:
                await asyncio.sleep(wait)
                wait = await self._call(lambda b: b.reserve(*turns[1]))
        await asyncio.sleep(wait)

    async def _wait_halt(self) -> None:
        """Sleep out a RetryAfter's halt (one met meanwhile extends it: look again)."""
        left = self._halted_until - time.monotonic()
        while left > 0:
            await asyncio.sleep(left)
            left = self._halted_until - time.monotonic()

    async def _halt(self, seconds: float) -> None:
        """Hold this process's requests for `seconds`, and the other replicas' through the
        overall bucket (they'd hit the same limit)."""
        self._halted_until = max(self._halted_until, time.monotonic() + seconds)
        overall = self._overall
        if overall:
            await self._call(lambda b: b.hold("tg:all", seconds, *overall))

    async def _prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        await self._call(lambda b: b.prune())

    async def _call(self, op: Callable[[RateBuckets], Coroutine[Any, Any, T]]) -> T:
        """`op` on the shared buckets, or on this process's while they can't be reached."""
        if self._shared is not None:
            try:
                result = await op(self._shared)
            except (StorageUnavailable, WriterClosed) as exc:
                if not self._using_local:
                    log.warning("shared rate limits unavailable (%s): limiting this process", exc)
                self._using_local = True
            else:
                if self._using_local:
                    log.warning("shared rate limits available again")
                self._using_local = False
                return result
        return await op(self._local)


def _group_of(chat_id: object) -> int | str | None:
    """The group or channel a request's chat_id names, as AIORateLimiter reads it: a negative
    id (also as a string), or an @username (only supergroups and channels have one)."""
    if not isinstance(chat_id, int | str):
        return None
    try:
        number = int(chat_id)
    except ValueError:
        return chat_id or None
    return number if number < 0 else None


def _rate(max_rate: float, period: float, burst: float | None) -> tuple[float, float] | None:
    """(interval, burst) of a limit, None when it is off."""
    if not max_rate or not period:
        return None
    return period / max_rate, max_rate if burst is None else burst
